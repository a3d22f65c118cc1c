"""The data plane: sources in, Parquet shards and a manifest out, Ray Data streams back.

    schema     the one in-memory record (`Sample`) and the shards' Parquet schema
    images     decoding (PNG, JPEG, DICOM) within a pixel budget, resizing, normalization
    tokenizer  the word-level vocabulary of notes and findings
    synth      the procedural chest-radiograph generator with known ground truth
    ingest     the generic manifest (CSV/JSONL) and IU X-Ray sources, with per-row rejections
    shards     writing shards and manifest.json (sha256 per shard)
    prepare    the prepare stage, `run_prepare(PrepareConfig) -> PrepareResult`
    dataset    opening and verifying a dataset, Ray Data streaming, local batches
    batches    collating rows into model tensors

Library layer: the stages, the library and the entry points may import it; it imports only
`medfusion.config`, `medfusion.loader`, `medfusion.storage` and its own modules.
"""
