"""The C++/CUDA sources of the T-table op (``torch.ops.duo_fast.ttable_lookup``), installed as
``duo_fast.csrc`` so that an install that could not prebuild them compiles them on first use
(``duo_fast._ext``)."""
