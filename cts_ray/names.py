"""The names config validation accepts for registries whose implementations need torch: the
models (``models.MODELS``) and CTS objectives (``objectives.OBJECTIVES``). Kept here so a config,
a sweep file's ``--dry-run`` or a cache key imports no torch. A new model or objective is added in
both places; tests/test_light_imports.py fails until they agree.
"""

MODELS = ("mlp_digits", "lenet_300_100", "lenet5", "conv4", "resnet20", "resnet32", "resnet56", "vgg16",
          "resnet18", "resnet50", "wrn28_10", "wrn16_2", "vit_tiny", "swin_t")
RESNETS = {"resnet20", "resnet32", "resnet56", "resnet18"}   # the builders that take ``shortcut``
STEMS = {"resnet18", "resnet50"}                            # ... and ``stem``
OBJECTIVES = ("ce", "kl_reverse", "kl_forward", "mse_logits", "feature_mse")
