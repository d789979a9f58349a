"""Data in, scores out: GLUE and custom classification data (classification), data-to-text data
and beam search (generation), Hub datasets as Parquet (hub), and the metrics of both (metrics,
nlg_metrics)."""
