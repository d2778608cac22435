"""No pickle anywhere: nothing the project runs may deserialize Python objects from bytes (the planes
speak msgspec, weights load from safetensors). A grep over every Python file in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(
    r"^\s*(import|from)\s+(c?pickle|_pickle|dill|cloudpickle|shelve|marshal)\b"  # the modules themselves
    r"|\b(c?pickle|dill|cloudpickle|marshal)\.(loads?|dumps?|Unpickler|Pickler)\b"
    r"|\b(send|recv)_pyobj\b"  # pyzmq's pickle helpers
    r"|\bsend_serialized\b|\brecv_serialized\b"
    r"|\btorch\.load\s*\("  # pickle underneath
    r"|allow_pickle\s*=\s*True",
    re.M,
)
SKIP_DIRS = {".venv", ".git", "node_modules", "build", "dist", ".whl"}


def python_files() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]


def test_no_pickle_in_the_code() -> None:
    files = python_files()
    assert len(files) > 50
    this = Path(__file__).resolve()
    hits = [f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0).strip()}"
            for path in files if path.resolve() != this
            for text in [path.read_text(errors="replace")] for m in FORBIDDEN.finditer(text)]
    assert not hits, "pickle-style deserialization found:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_should() -> None:
    for bad in ("import pickle", "from pickle import loads", "x = pickle.loads(b)", "sock.recv_pyobj()",
                "torch.load(path)", "np.load(f, allow_pickle=True)", "import dill"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("msgspec.msgpack.decode(frame)", "safetensors.torch.load_file(p)", "# no pickle here"):
        assert not FORBIDDEN.search(fine), fine
