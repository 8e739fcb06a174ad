"""Reading and writing model files: Hugging Face folders (``hf_folder``: the public layout we
export; ``pretrained``: loading a HF folder, a hub id or a public Lightning ``.ckpt`` with no
conversion), and unpickling without running code (``safe_pickle``).

May import: ``duo_fast.core``, ``duo_fast.model``.
"""
