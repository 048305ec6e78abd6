"""Data checks at train time, before any model is loaded: the data card written into edge_lora.json, and the
train/eval overlap gate.

The card: sample counts, token lengths as trained (min/p50/p90/max after truncation to max_length), how many
samples were truncated, exact duplicates and near-duplicates within the training set, and how many eval samples
(nearly) duplicate a training sample.

Samples are compared as normalised text (Unicode NFKC, case-folded, runs of whitespace as one space) of the
whole record: prompt and completion, every turn of a conversation, or the text. Exact duplicates share the
sha256 of that text. Near-duplicates have a Jaccard similarity of their sets of character 5-gram shingles of at
least `near_duplicate_jaccard` (default 0.8: one changed word in a sentence of a dozen is still a duplicate;
"2024-03-17 -> 17.03.2024" and the next day, at 0.33, is not). Finding them scales as MinHash with LSH does:
100 hash functions in 20 bands of 5 rows make every pair of similarity >= 0.8 a candidate with probability
> 0.999 (0.6: 0.8), and each candidate is then checked with its exact Jaccard, so no pair below the threshold is
ever reported. Within an LSH bucket each sample is checked against the bucket's first training sample only,
which keeps the work linear in the data; a near-duplicate of a sample that shares no bucket with it can be
missed, with the probability above.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from pathlib import Path

import numpy as np

from edge_lora.errors import UsageError
from edge_lora.train.data import SHAPES, read_jsonl, split_record

SHINGLE = 5  # characters (UTF-8 bytes) per shingle
BANDS, ROWS = 20, 5  # LSH: BANDS * ROWS MinHash functions
SEED = 0
SHOWN = 5  # offending lines named in the card and in the error
_CHUNK_ROWS = 16384  # shingles hashed at once by every MinHash function
_SPACE = re.compile(r"\s+")


class OverlapError(UsageError):
    """Eval samples duplicate training samples beyond the allowed fraction; nothing was loaded or trained."""


def normalise(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def record_text(record: dict, where: str) -> str:
    """The whole text of a record, as the duplicate checks compare it."""
    if "messages" in record:
        messages = record["messages"]
        turns_ok = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        )
        if not turns_ok:
            raise UsageError(f'{where}: "messages" must be a list of {{"role", "content"}} strings — {SHAPES}')
        return "\n".join(f"{m.get('role')}: {m['content']}" for m in messages)
    prompt, completion = split_record(record, where)
    return f"{prompt}\n{completion}" if prompt else completion


def read_texts(path: str | Path) -> list[tuple[str, str]]:
    """(file:line, normalised text) of every record."""
    return [
        (f"{path}:{lineno}", normalise(record_text(record, f"{path} line {lineno}")))
        for lineno, record in read_jsonl(path)
    ]


def percentiles(lengths: list[int]) -> dict:
    values = np.sort(np.asarray(lengths))

    def rank(q: float) -> int:  # nearest rank: a length some sample really has
        return int(values[max(0, int(np.ceil(q * len(values))) - 1)])

    return {"min": int(values[0]), "p50": rank(0.5), "p90": rank(0.9), "max": int(values[-1])}


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every text's shingle hashes (uint32, text after text; repeats kept) and the start of each text's run.

    All texts are hashed at once: a polynomial over each 5-byte window of their concatenation, splitmix64's
    finaliser to spread the bits, then the windows that cross from one text into the next are dropped. A text
    shorter than a shingle is one shingle of its own.
    """
    encoded = [t.encode() for t in texts]
    sizes = np.array([len(b) for b in encoded], dtype=np.int64)
    buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
    windows = max(buffer.size - SHINGLE + 1, 0)
    rolled = buffer[:windows].copy()
    for k in range(1, SHINGLE):  # in place: the arrays are as long as all the text together
        rolled *= np.uint64(1099511628211)
        rolled += buffer[k : k + windows]
    valid = np.ones(windows, dtype=bool)
    tails = (np.cumsum(sizes)[:, None] - np.arange(1, SHINGLE)).ravel()  # each text's last SHINGLE-1 window starts
    valid[tails[(tails >= 0) & (tails < windows)]] = False
    counts = np.maximum(sizes - SHINGLE + 1, 1)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    short = np.flatnonzero(sizes < SHINGLE)
    own = np.zeros(bounds[-1], dtype=bool)
    own[bounds[short]] = True
    hashes = np.empty(bounds[-1], dtype=np.uint64)
    hashes[~own] = rolled[valid]
    hashes[own] = [int.from_bytes(hashlib.blake2b(encoded[i], digest_size=8).digest(), "little") for i in short]
    return (mix(hashes) >> np.uint64(32)).astype(np.uint32), bounds


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def minhash(hashes: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """MinHash signatures (texts, BANDS * ROWS): per function, the least of (a * h + b) mod 2**32 over a text's
    shingles (a odd: a permutation of the 32-bit hashes). On well-mixed hashes its similarity estimates have the
    textbook error, sqrt(J (1 - J) / functions); 32-bit words halve the memory traffic of 64-bit ones."""
    rng = np.random.default_rng(SEED)
    a = (rng.integers(1, 2**31, BANDS * ROWS, dtype=np.uint32) | np.uint32(1))[:, None]
    b = rng.integers(0, 2**31, BANDS * ROWS, dtype=np.uint32)[:, None]
    n = len(bounds) - 1
    signatures = np.empty((BANDS * ROWS, n), dtype=np.uint32)
    first = 0
    while first < n:  # texts [first, last) at a time, about _CHUNK_ROWS shingles: (functions, shingles) stays in cache
        last = min(n, max(first + 1, int(np.searchsorted(bounds, bounds[first] + _CHUNK_ROWS, side="right")) - 1))
        signatures[:, first:last] = np.minimum.reduceat(
            a * hashes[bounds[first] : bounds[last]] + b, bounds[first:last] - bounds[first], axis=1
        )
        first = last
    return signatures.T


def candidates(signatures: np.ndarray, is_eval: np.ndarray) -> np.ndarray:
    """Pairs (training sample, other sample) that share an LSH bucket, as rows of an (m, 2) array: in each
    bucket, every member is paired with the bucket's first training sample."""
    n = len(signatures)
    weights = np.random.default_rng(SEED + 1).integers(1, 2**63, ROWS, dtype=np.uint64) | np.uint64(1)
    pairs = []
    for band in range(BANDS):
        keys = (signatures[:, band * ROWS : (band + 1) * ROWS].astype(np.uint64) * weights).sum(axis=1)  # wraps: a hash
        order = np.lexsort((is_eval, keys))  # training samples first within a bucket
        sorted_keys = keys[order]
        new_bucket = np.ones(n, dtype=bool)
        new_bucket[1:] = sorted_keys[1:] != sorted_keys[:-1]
        head = order[np.maximum.accumulate(np.where(new_bucket, np.arange(n), 0))]
        member = ~new_bucket & ~is_eval[head]
        pairs.append(np.stack([head[member], order[member]], axis=1))
    both = np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64)
    return np.unique(both, axis=0)


def jaccard(hashes: np.ndarray, bounds: np.ndarray, i: int, j: int) -> float:
    a = np.unique(hashes[bounds[i] : bounds[i + 1]])
    b = np.unique(hashes[bounds[j] : bounds[j + 1]])
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common)


def near_pairs(texts: list[str], is_eval: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(training index, other index, Jaccard) of every candidate pair whose exact Jaccard is >= `threshold`.

    Candidates whose MinHash estimate (the fraction of equal signature values) is below threshold - 0.2 are
    dropped first: that is five standard errors of the estimate at 0.8, and it saves most exact checks.
    """
    if len(texts) < 2:
        return []
    hashes, bounds = shingle_hashes(texts)
    signatures = minhash(hashes, bounds)
    pairs = candidates(signatures, is_eval)
    estimate = (signatures[pairs[:, 0]] == signatures[pairs[:, 1]]).mean(axis=1)
    found = []
    for i, j in pairs[estimate >= threshold - 0.2]:
        similarity = jaccard(hashes, bounds, int(i), int(j))
        if similarity >= threshold:
            found.append((int(i), int(j), similarity))
    return found


def check_data(config, examples: list, report) -> dict:
    """The data card of `config.data` (and `config.eval_data`); raises OverlapError when more than
    config.max_overlap of the eval samples duplicate training samples, unless config.allow_overlap.

    `examples` and `report` are what edge_lora.train.data.load_examples returned for the training file.
    """
    started = time.perf_counter()
    train = read_texts(config.data)
    first_of: dict[str, int] = {}
    exact = []  # (earlier index, duplicate index)
    for i, (_, text) in enumerate(train):
        if text in first_of:
            exact.append((first_of[text], i))
        else:
            first_of[text] = i
    unique = sorted(first_of.values())
    held = read_texts(config.eval_data) if config.eval_data else []
    held_exact = {j: first_of[text] for j, (_, text) in enumerate(held) if text in first_of}
    held_rest = [j for j in range(len(held)) if j not in held_exact]
    texts = [train[i][1] for i in unique] + [held[j][1] for j in held_rest]
    is_eval = np.arange(len(texts)) >= len(unique)
    near_train, near_held = {}, {}
    for a, b, similarity in near_pairs(texts, is_eval, config.near_duplicate_jaccard):
        if is_eval[b]:
            near_held.setdefault(held_rest[b - len(unique)], (unique[a], similarity))
        else:
            near_train.setdefault(unique[max(a, b)], (unique[min(a, b)], similarity))
    card = {
        "train": {
            "path": str(config.data),
            "sha256": report.sha256,
            "samples": len(train),
            "tokens": percentiles([len(e.input_ids) for e in examples]),
            "max_length": config.max_length,
            "truncated": report.truncated,
            "exact_duplicates": {
                "count": len(exact),
                "examples": [f"{train[j][0]} = {train[i][0]}" for i, j in exact[:SHOWN]],
            },
            "near_duplicates": {
                "count": len(near_train),
                "jaccard": config.near_duplicate_jaccard,
                "method": f"character {SHINGLE}-gram shingles, MinHash {BANDS}x{ROWS} LSH, exact Jaccard check",
                "examples": [
                    f"{train[j][0]} ~ {train[i][0]} ({s:.2f})" for j, (i, s) in sorted(near_train.items())[:SHOWN]
                ],
            },
        },
        "eval": None,
        "overlap": None,
    }
    if config.eval_data:
        card["eval"] = {"path": str(config.eval_data), "samples": len(held)}
        card["overlap"] = overlap(config, train, held, held_exact, near_held)
    card["seconds"] = round(time.perf_counter() - started, 3)
    return card


def overlap(config, train: list, held: list, held_exact: dict, near_held: dict) -> dict:
    named = sorted(
        [(j, f"{held[j][0]} = {train[i][0]}") for j, i in held_exact.items()]
        + [(j, f"{held[j][0]} ~ {train[i][0]} ({s:.2f})") for j, (i, s) in near_held.items()]
    )
    count = len(named)
    fraction = count / len(held)
    result = {
        "count": count,
        "exact": len(held_exact),
        "near": len(near_held),
        "fraction": round(fraction, 6),
        "max_fraction": config.max_overlap,
        "allowed": config.allow_overlap,
        "examples": [text for _, text in named[:SHOWN]],
    }
    if fraction > config.max_overlap and not config.allow_overlap:
        shown = ", ".join(result["examples"]) + (f" and {count - SHOWN} more" if count > SHOWN else "")
        raise OverlapError(
            f"{config.eval_data}: {count} of {len(held)} eval samples ({fraction:.1%}) duplicate training samples "
            f"(= exact, ~ near: Jaccard >= {config.near_duplicate_jaccard}), "
            f"more than max_overlap {config.max_overlap:.1%}: "
            f"{shown} — remove them from one of the files, or pass --allow-overlap to train anyway"
        )
    return result
