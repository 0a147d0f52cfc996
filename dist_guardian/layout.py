"""Every on-disk name of dist_guardian: step dirs, staging, trash, quarantine, journal, claims, files.

What belongs here: the names and patterns a checkpoint store holds, and the small helpers that
build or parse them, so that a writer and every reader agree by construction (orbax keeps its
``NameFormat`` in one module for the same reason). Nothing here touches a filesystem. Every
pattern matches the whole string (``\\Z``: a trailing newline is not a plain name), and every
number a writer can put in a name is one the pattern reads back (``MAX_*`` of ``manifest``).
"""

from __future__ import annotations

import re
import uuid

# ----------------------------------------------------------------------------- names people choose

# A run name, a tmp:// store name: one path component, no dot first (no "..", no hidden names).
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\Z")
# A file named in a manifest: one path component inside its checkpoint directory.
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}\Z")

# ----------------------------------------------------------------------------- <store>/<run>/

# step-000000001200 (the first lineage), step-000000001200-g3 beside another generation (F36).
# 13 generation digits: manifest.MAX_GENERATION is 2**40.
STEP_DIR_RE = re.compile(r"^step-(\d{1,20})(?:-g(\d{1,13}))?\Z")
STAGING_PREFIX = ".staging-"
STAGING_RE = re.compile(r"^\.staging-step-(\d{1,20})-([0-9a-f]{8,32})\Z")
TRASH_PREFIX = ".trash-"  # a deleted checkpoint's dir, renamed first (atomic), removed after (F41)
QUARANTINE_PREFIX = ".quarantine-"  # a damaged local replica set aside by repair (kept, never deleted)
JOURNAL_DIR = ".journal"  # resume attempts, the crash-loop breaker
CLAIMS_DIR = ".writers"  # <run>/.writers/<step dir>.json: who is uploading that checkpoint to an object store

# ----------------------------------------------------------------------------- inside a checkpoint

MANIFEST_NAME = "manifest.json"  # written last: its presence is the commit
NATIVE_SUFFIX = ".dgt"
REPLICATED_FILE = "replicated.dgt"
# rank-00001-of-00004.dgt; 5 to 7 digits: manifest.MAX_WORLD_SIZE is 2**20.
RANK_FILE_RE = re.compile(r"^rank-(\d{5,7})-of-(\d{5,7})\.dgt\Z")
# shards-00001-of-00004.dgt: the chunks of sharded tensors one rank wrote (their geometry is in the manifest).
SHARD_FILE_RE = re.compile(r"^shards-(\d{5,7})-of-(\d{5,7})\.dgt\Z")
DCP_METADATA = ".metadata"  # what makes a directory a PyTorch DCP checkpoint
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"  # a bare safetensors file (a model's weights, no optimizer)
# One shard of a set: model-00001-of-00003.safetensors (the set is one candidate, found by its first shard).
SAFETENSORS_SHARD_RE = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.safetensors\Z")


def safetensors_set(name: str) -> list[str] | None:
    """Every shard name of the set whose FIRST shard is ``name`` ([name] for a single file; None for a later shard)."""
    m = SAFETENSORS_SHARD_RE.match(name)
    if m is None:
        return [name]
    if int(m.group(2)) != 1:
        return None
    n = int(m.group(3))
    return [f"{m.group(1)}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def step_dir_name(step: int, generation: int | None = None) -> str:
    return f"step-{step:012d}" + (f"-g{generation}" if generation is not None else "")


def new_staging_name(step: int) -> str:
    return f"{STAGING_PREFIX}step-{step:012d}-{uuid.uuid4().hex[:16]}"


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}{NATIVE_SUFFIX}"


def shard_file_name(rank: int, world_size: int) -> str:
    return f"shards-{rank:05d}-of-{world_size:05d}{NATIVE_SUFFIX}"


def trash_name(dirname: str) -> str:
    return f"{TRASH_PREFIX}{dirname}-{uuid.uuid4().hex[:8]}"


def claim_rel(run: str, dirname: str) -> str:
    return f"{run}/{CLAIMS_DIR}/{dirname}.json"


def split_run_rel(rel: str) -> tuple[str, str]:
    """``("run", "step-...")`` of a checkpoint's location relative to its store (``run/step-...``)."""
    run, _, name = rel.partition("/")
    return run, name
