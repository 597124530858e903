"""The helpers of tokenizing datasets, behind the CLIs ``python -m snac_accel.encode`` and ``.decode``.

- `tokens`: token layouts (per level, or interleaved frame by frame) and level offsets.
- `chunks`: long files in chunks on SNAC's padding grid, batches of one padded length, CPU encoding.
- `source_rows`: the source's rows (audio undecoded, id, kept columns), decoded in loader workers.
- `codes`: the tokenized folder: shards, its info and card, reading it back, the push.
"""
