"""Knowledge bases: ingest, index, persist and search text, table and image-text corpora."""
