"""Offline text for the demo model: a fixed list of the Python standard library's own .py files.

Every Python install has these files (`sysconfig.get_paths()["stdlib"]`), so training and evaluation need no download.
The list holds only pure-Python modules present as the same path in CPython 3.10 to 3.13 (modules removed by PEP 594,
distutils/asyncore/imp, modules that became packages such as pathlib and re, and parts distros split off such as
tkinter, idlelib, ensurepip and test are left out). The files' contents differ a little between versions; the split does not.

Split: files sorted by relative path; every 10th (index 9, 19, ...) is held out for evaluation, the rest are for training.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

HOLDOUT_EVERY = 10

_TOP = """
abc argparse ast base64 bdb bisect bz2 calendar cmd code codecs codeop colorsys compileall configparser contextlib
contextvars copy copyreg csv dataclasses datetime difflib dis doctest enum filecmp fileinput fnmatch fractions ftplib
functools genericpath getopt getpass gettext glob graphlib gzip hashlib heapq hmac imaplib inspect io ipaddress keyword
linecache locale lzma mailbox mimetypes modulefinder netrc ntpath numbers opcode operator optparse os pdb pickle
pickletools pkgutil platform plistlib poplib posixpath pprint profile pstats py_compile pyclbr queue quopri random
reprlib rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtplib socket socketserver ssl stat
statistics string stringprep struct subprocess symtable tabnanny tarfile tempfile textwrap threading timeit token
tokenize trace traceback tracemalloc types typing uuid warnings wave weakref zipapp zipimport
"""

_PACKAGED = """
asyncio/base_events asyncio/coroutines asyncio/events asyncio/exceptions asyncio/futures asyncio/locks
asyncio/protocols asyncio/queues asyncio/runners asyncio/selector_events asyncio/streams asyncio/subprocess
asyncio/tasks asyncio/transports asyncio/unix_events
collections/__init__ concurrent/futures/_base concurrent/futures/process concurrent/futures/thread
email/_header_value_parser email/_parseaddr email/_policybase email/base64mime email/charset email/contentmanager
email/encoders email/errors email/feedparser email/generator email/header email/headerregistry email/iterators
email/message email/parser email/policy email/quoprimime email/utils
html/__init__ html/parser http/__init__ http/client http/cookiejar http/cookies http/server
importlib/__init__ importlib/_bootstrap importlib/_bootstrap_external importlib/machinery importlib/util
json/__init__ json/decoder json/encoder json/scanner logging/__init__ logging/config logging/handlers
multiprocessing/connection multiprocessing/context multiprocessing/managers multiprocessing/pool
multiprocessing/process multiprocessing/queues multiprocessing/synchronize multiprocessing/util
sqlite3/__init__ sqlite3/dump
unittest/__init__ unittest/case unittest/loader unittest/main unittest/mock unittest/result unittest/runner
unittest/suite unittest/util
urllib/error urllib/parse urllib/request urllib/response urllib/robotparser
xml/dom/minidom xml/dom/pulldom xml/etree/ElementPath xml/etree/ElementTree xml/sax/expatreader xml/sax/handler
xml/sax/saxutils xml/sax/xmlreader
"""

CORPUS_FILES: tuple[str, ...] = tuple(sorted(f"{name}.py" for name in (_TOP + _PACKAGED).split()))


def stdlib_dir() -> Path:
    """The standard library's source folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_files() -> tuple[list[str], list[str]]:
    """(train, held_out) relative paths: every HOLDOUT_EVERY-th file of the sorted list (index 9, 19, ...) is held out."""
    held = [f for i, f in enumerate(CORPUS_FILES) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    train = [f for i, f in enumerate(CORPUS_FILES) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    return train, held


def read_files(names: list[str] | tuple[str, ...], root: Path | None = None, allow_missing: bool = False) -> dict[str, bytes]:
    """Raw bytes of each named file under the stdlib folder (or `root`), in the given order.

    A missing file raises FileNotFoundError naming every missing path, unless `allow_missing` (then it is skipped)."""
    root = stdlib_dir() if root is None else Path(root)
    missing = [n for n in names if not (root / n).is_file()]
    if missing and not allow_missing:
        raise FileNotFoundError(
            f"standard library folder {root} lacks {len(missing)} of the demo corpus files: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} (expected the CPython 3.10-3.13 pure-Python modules listed in "
            f"moequant/data/stdlib_corpus.py)")
    return {n: (root / n).read_bytes() for n in names if n not in missing}


def eval_windows(texts: dict[str, bytes], seq_len: int, max_windows_per_file: int | None = None,
                 pad_id: int = 256, bos_id: int = 257, eos_id: int = 258,
                 ignore_index: int = -100) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Byte-level evaluation windows: (inputs [N, S], targets [N, S]) int64, S = seq_len.

    Each file is <bos> + bytes + <eos>, cut into consecutive windows of S inputs; targets[n, s] is the token after
    inputs[n, s], set to ignore_index where it is not a byte (the closing <eos>, padding). So every byte of a file is
    predicted once, the first from <bos>; a short last window is padded with pad_id. Files in the dict's order."""
    import torch

    inputs, targets = [], []
    for data in texts.values():
        ids = torch.tensor([bos_id, *data, eos_id], dtype=torch.long)
        n_win = max(1, -(-(len(ids) - 1) // seq_len))
        if max_windows_per_file is not None:
            n_win = min(n_win, max_windows_per_file)
        for w in range(n_win):
            x = torch.full((seq_len,), pad_id, dtype=torch.long)
            y = torch.full((seq_len,), ignore_index, dtype=torch.long)
            chunk = ids[w * seq_len: (w + 1) * seq_len + 1]
            x[: len(chunk) - 1] = chunk[:-1]
            y[: len(chunk) - 1] = torch.where(chunk[1:] < 256, chunk[1:], torch.full_like(chunk[1:], ignore_index))
            inputs.append(x)
            targets.append(y)
    return torch.stack(inputs), torch.stack(targets)
