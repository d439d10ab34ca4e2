"""The checkpoint format and everything that reads or writes it (docs/checkpoints.md).

- ``format``: names, constants, ``CheckpointError``;
- ``files``: atomic save directories (begin, commit, prune, the ``latest`` pointer);
- ``manifest``: per-file checksums, written last, verified on load;
- ``find``: the one finder of the checkpoint to read (``resolve``, ``latest_checkpoint``) and of the
  newest one that verifies for a resume;
- ``state``: ``trainer_state.json``, ``config.yaml``, RNG states;
- ``weights``: the layout-free weights (``model/``), read and written one tensor at a time;
- ``verified_read``: safetensors files read into place, their checksums computed in the same pass;
- ``safetensors_stream``: lazy tensors and a streaming safetensors writer;
- ``engine``: the collective save and the exact resume of a DeepSpeed engine;
- ``writer``: asynchronous saves (host copies, a writer thread, per-rank completion markers).
"""
