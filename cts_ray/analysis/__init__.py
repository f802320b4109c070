"""Statistics, tables, plots and the Markdown report from a sweep's Parquet result tables.

``load`` reads and checks the trials; ``insensitivity``, ``seeds`` and ``comparison`` each answer
one question (structured rows + Markdown + a plot); ``report`` puts them together.
"""
