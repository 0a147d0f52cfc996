"""Fuzzing with hypothesis: every parser of untrusted bytes fails only with its own error, never hangs,
never executes anything, and a resume over damaged files ends in a load, a fresh start or a
DistGuardianError, touching nothing outside its store.

Reproducible: every test runs under a derandomized profile (fixed seed, no example database), so
CI sees the same examples on every run. Each test has a per-example deadline (a hang fails it) and
a small ``max_examples`` so the whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import struct
import tempfile

import helpers
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dist_guardian import DistGuardianError, Guardian, discovery, formats, manifest, planning, stores
from dist_guardian.candidate import Candidate
from dist_guardian.errors import CheckpointFormatError
from dist_guardian.manifest import ManifestError

RUN = "r"


def profile(n: int, deadline_ms: int = 2000) -> settings:
    # No "explain" phase: its line tracer makes a failing resume example take minutes on Python 3.11.
    return settings(
        max_examples=n,
        deadline=deadline_ms,
        derandomize=True,
        database=None,
        print_blob=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


# ----------------------------------------------------------------------------- mutations


def mutate(data: st.DataObject, raw: bytes, *, hot: int | None = None, max_ops: int = 4) -> bytes:
    """A few byte-level edits of ``raw``: bit flips, overwrites, deletions, insertions, truncation, duplication.

    ``hot``: about half of the edits land in ``raw[:hot]`` (a header), where structure lives.
    """
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, max_ops), label="ops")):
        op = data.draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "dup", "zero"]), label="op")
        if not b:
            b += data.draw(st.binary(min_size=1, max_size=16), label="seed bytes")
            continue
        hi = len(b) - 1
        if hot and data.draw(st.booleans(), label="in header"):
            hi = min(hi, hot - 1)
        i = data.draw(st.integers(0, hi), label="at")
        if op == "flip":
            b[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set":
            b[i] = data.draw(st.integers(0, 255), label="byte")
        elif op == "delete":
            del b[i : i + data.draw(st.integers(1, 64), label="len")]
        elif op == "insert":
            b[i:i] = data.draw(st.binary(min_size=1, max_size=32), label="inserted")
        elif op == "truncate":
            del b[i:]
        elif op == "dup":
            b[i:i] = b[i : i + data.draw(st.integers(1, 64), label="len")]
        else:
            n = data.draw(st.integers(1, 64), label="len")
            b[i : i + n] = bytes(min(n, len(b) - i))
    return bytes(b)


JSON_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**64, 10**400, -(10**400), -1, 0, 10**15, 2**63 - 1]),
    st.floats(),
    st.sampled_from([1e308, -1e308, 1e-320]),
    st.text(max_size=40),
    st.sampled_from(["../../x", "/abs/x", "a/../../b", "x\x00y", "..", ".", "", "manifest.json", "0" * 40, "f" * 32]),
)
JSON_VALUES = st.recursive(
    JSON_ODD,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def json_mutate(data: st.DataObject, doc, max_ops: int = 3):
    """Replace, delete or add values anywhere in a JSON document (types and ranges go wrong, not syntax)."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, max_ops), label="json ops")):
        paths = list(_paths(doc))
        path = data.draw(st.sampled_from(paths), label="path")
        if not path:
            if data.draw(st.booleans(), label="replace root"):
                doc = data.draw(JSON_VALUES, label="root")
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["replace", "delete", "add"]), label="json op")
        if op == "replace":
            parent[path[-1]] = data.draw(JSON_VALUES, label="value")
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12), label="new key")] = data.draw(JSON_VALUES, label="value")
        else:
            parent.append(data.draw(JSON_VALUES, label="value"))
    return doc


def dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


# ----------------------------------------------------------------------------- samples

D1, D2 = "0123456789abcdef" * 2, "fedcba9876543210" * 2


def valid_manifest() -> bytes:
    return manifest.build(
        manifest.ManifestDraft(
            run=RUN,
            step=200,
            generation=1,
            world_size=2,
            created_unix=1.7e9,
            compat={"model": "m"},
            metrics={"loss": 0.5},
            files=[
                manifest.FileEntry(name="replicated.dgt", size=1234, digest=D1),
                manifest.FileEntry(name="rank-00001-of-00002.dgt", size=99, digest=D2, rank=1),
            ],
            tensors={"replicated.dgt": {"model/w": manifest.TensorStat(digest=D1, max_abs=2.5, finite=True)}},
            torch_version="2.x",
            writer={"host": "h"},
            layout={"model": "f" * 32},
        )
    )


def valid_native() -> tuple[bytes, int]:
    """A native file (header, then tensors) and its header length."""
    specs = [
        formats.TensorSpec("w", "F32", (2, 3), memoryview(struct.pack("<6f", *range(6)))),
        formats.TensorSpec("n", "I64", (2,), memoryview(struct.pack("<2q", 7, 8))),
        formats.TensorSpec("e", "BF16", (0,), memoryview(b"")),
    ]
    fd, path = tempfile.mkstemp()
    try:
        formats.write_native(fd, json.dumps({"w": {"__tensor__": "w"}}), specs)
        os.close(fd)
        with open(path, "rb") as f:
            raw = f.read()
    finally:
        os.unlink(path)
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, 8 + n


class _Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_marker")


@pytest.fixture(scope="module")
def torch_files(marker_dir):
    """A torch.save file whose pickle runs ``touch <marker>``, and a clean one (both zip, CRCs on)."""
    marker = marker_dir / "pwned"
    evil, clean = io.BytesIO(), io.BytesIO()
    torch.save({"model": _Evil(f"touch {marker}"), "step": 7}, evil)
    torch.save({"model": {"w": torch.arange(6.0)}, "step": 7}, clean)
    # Control: the payload is live when unpickled unsafely (so "marker absent" means something).
    control = marker_dir / "control"
    ctl = io.BytesIO()
    torch.save({"model": _Evil(f"touch {control}")}, ctl)
    ctl.seek(0)
    torch.load(ctl, weights_only=False)
    assert control.exists()
    return {"evil": evil.getvalue(), "clean": clean.getvalue(), "marker": marker}


# ----------------------------------------------------------------------------- manifest.parse


@profile(300)
@given(raw=st.binary(max_size=600))
def test_manifest_parse_arbitrary_bytes_only_manifest_error(raw):
    try:
        mf = manifest.parse(raw)
    except ManifestError:
        return
    _check_manifest_invariants(mf)


@profile(300)
@given(data=st.data())
def test_manifest_parse_mutated_bytes_only_manifest_error(data):
    raw = mutate(data, valid_manifest())
    try:
        mf = manifest.parse(raw)
    except ManifestError:
        return
    _check_manifest_invariants(mf)


@profile(400)
@given(data=st.data())
def test_manifest_parse_mutated_fields_only_manifest_error(data):
    """Type and range damage (2**64 steps, 10**400 timestamps, NaN, path escapes) inside valid JSON."""
    doc = json_mutate(data, json.loads(valid_manifest()))
    try:
        mf = manifest.parse(dumps(doc))
    except ManifestError:
        return
    _check_manifest_invariants(mf)


@pytest.mark.parametrize(
    "field,value",
    [
        ("created_unix", "1" + "0" * 400),
        ("created_unix", "1e400"),
        ("created_unix", "-1e400"),
        ("max_abs", "1" + "0" * 400),
        ("max_abs", "1e999"),
    ],
)
def test_manifest_parse_numbers_beyond_float_are_manifest_errors(field, value):
    """Found by the field fuzzer: 10**400 made float() raise OverflowError, 1e400 parsed as inf."""
    doc = json.loads(valid_manifest())
    raw = json.dumps(doc, separators=(",", ":")).encode()
    if field == "created_unix":
        raw = raw.replace(b'"created_unix":1700000000.0', b'"created_unix":' + value.encode())
    else:
        raw = raw.replace(b'"max_abs":2.5', b'"max_abs":' + value.encode())
    assert value.encode() in raw
    with pytest.raises(ManifestError, match="finite number"):
        manifest.parse(raw)


def _check_manifest_invariants(mf: manifest.Manifest) -> None:
    assert 0 <= mf.step <= manifest.MAX_STEP
    assert 1 <= mf.world_size <= manifest.MAX_WORLD_SIZE
    assert math.isfinite(mf.created_unix)
    assert mf.files
    for f in mf.files:
        assert manifest.check_file_name(f.name) == f.name and f.name != manifest.MANIFEST_NAME
        assert "/" not in f.name and ".." not in f.name and "\x00" not in f.name
        assert 0 <= f.size <= manifest.MAX_FILE_SIZE
        assert f.rank is None or 0 <= f.rank < mf.world_size
    for stats in mf.tensors.values():
        for s in stats.values():
            assert s.max_abs is None or math.isfinite(s.max_abs)


def test_manifest_samples_are_valid():
    """The fuzz seeds themselves parse (otherwise the mutation tests would prove little)."""
    mf = manifest.parse(valid_manifest())
    assert mf.step == 200 and len(mf.files) == 2
    raw, head = valid_native()
    h = formats.parse_header(io.BytesIO(raw), len(raw))
    assert [e.name for e in h.entries] == ["w", "n", "e"] or sorted(e.name for e in h.entries) == ["e", "n", "w"]
    assert h.data_start == head


# ----------------------------------------------------------------------------- formats.parse_header


def _parse_header(raw: bytes):
    try:
        h = formats.parse_header(io.BytesIO(raw), len(raw), name="fuzz.dgt")
    except CheckpointFormatError:
        return None
    # Whatever parses is self-consistent: tensors tile the payload exactly, nothing past the end.
    pos = 0
    for e in h.entries:
        assert e.begin == pos and e.end >= e.begin and e.dtype in formats.DTYPE_SIZES
        pos = e.end
    assert pos == h.payload_size and h.file_size == len(raw)
    return h


@profile(300)
@given(raw=st.binary(max_size=400))
def test_parse_header_arbitrary_bytes_only_format_error(raw):
    _parse_header(raw)


@profile(300)
@given(raw=st.binary(max_size=300))
def test_parse_header_plausible_length_prefix_only_format_error(raw):
    """Arbitrary JSON-ish bodies behind a length prefix that fits the file (past the first check)."""
    body = b"{" + raw
    _parse_header(struct.pack("<Q", len(body)) + body)


@profile(400)
@given(data=st.data())
def test_parse_header_mutated_native_file_only_format_error(data):
    raw, head = valid_native()
    _parse_header(mutate(data, raw, hot=head))


@profile(300)
@given(data=st.data())
def test_parse_header_mutated_header_fields_only_format_error(data):
    raw, head = valid_native()
    doc = json.loads(raw[8:head])
    doc = json_mutate(data, doc)
    blob = dumps(doc)
    blob += b" " * ((-(8 + len(blob))) % 8)
    _parse_header(struct.pack("<Q", len(blob)) + blob + raw[head:])


# ----------------------------------------------------------------------------- pickles and torch files


@profile(300)
@given(raw=st.binary(max_size=300))
def test_scan_pickle_arbitrary_bytes_never_raises(raw, torch_files):
    unsafe, step, problem = formats.scan_pickle(raw)
    assert isinstance(unsafe, tuple) and (problem is None or isinstance(problem, str))
    assert step is None or isinstance(step, int)
    assert not torch_files["marker"].exists()


def test_scan_finds_the_payload_in_the_unmutated_files(torch_files):
    rep = formats.sniff_torch_file(io.BytesIO(torch_files["evil"]), len(torch_files["evil"]), "evil.pt")
    assert rep.unsafe_globals == ("posix.system",)
    rep = formats.sniff_torch_file(io.BytesIO(torch_files["clean"]), len(torch_files["clean"]), "clean.pt")
    assert rep.ok and rep.crc == "ok" and rep.unsafe_globals == () and rep.step_key == 7


@profile(250, deadline_ms=3000)
@given(data=st.data(), which=st.sampled_from(["evil", "clean"]))
def test_sniff_mutated_torch_file_never_raises_never_executes(data, which, torch_files):
    raw = torch_files[which]
    m = mutate(data, raw)
    rep = formats.sniff_torch_file(io.BytesIO(m), len(m), "fuzz.pt")
    assert isinstance(rep, formats.TorchFileReport)
    assert rep.crc in ("ok", "mismatch", "off", "none")
    if which == "evil" and rep.ok:
        # A structurally loadable mutant of the evil file still names its global (or lost the call entirely).
        assert "posix.system" in rep.unsafe_globals or b"system" not in m
    assert not torch_files["marker"].exists()


@profile(150, deadline_ms=3000)
@given(data=st.data())
def test_scan_pickle_of_mutated_payload_pickle_never_executes(data, torch_files):
    import pickle

    raw = pickle.dumps(_Evil(f"touch {torch_files['marker']}"), protocol=data.draw(st.integers(0, 5), label="protocol"))
    unsafe, _step, problem = formats.scan_pickle(mutate(data, raw))
    assert isinstance(unsafe, tuple)
    assert not torch_files["marker"].exists()


# ----------------------------------------------------------------------------- step names


@profile(500)
@given(name=st.text(max_size=40) | st.from_regex(r"step-\d{1,25}(-g\d{1,14})?", fullmatch=True))
def test_step_names_parse_within_bounds(name):
    m = stores.STEP_DIR_RE.match(name)
    if m:
        assert name.startswith("step-") and "/" not in name and "\n" not in name
        assert 0 <= int(m.group(1)) < 10**20
        assert m.group(2) is None or 0 <= int(m.group(2)) < 10**13  # 13 digits: MAX_GENERATION = 2**40 (T03)
    s = formats.step_from_name(name)
    assert s is None or (isinstance(s, int) and 0 <= s < 10**15)
    s2 = formats.step_from_name("dir/" + name)
    assert s2 is None or 0 <= s2 < 10**15


@profile(300)
@given(step=st.integers(0, manifest.MAX_STEP), gen=st.none() | st.integers(0, manifest.MAX_GENERATION))
def test_step_dir_names_round_trip(step, gen):
    m = stores.STEP_DIR_RE.match(stores.step_dir_name(step, gen))
    assert m and int(m.group(1)) == step and (m.group(2) is None if gen is None else int(m.group(2)) == gen)


NAMES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "..",
            ".",
            "",
            ".staging-step-000000000300-abcdef0123",
            ".journal",
            "step-000000000100",
            "step-1-g2",
            "x.pt",
            "a/b",
            "/abs",
            "step-99999999999999999999",
        ]
    ),
)


@profile(300)
@given(
    entries=st.lists(
        st.tuples(NAMES, st.sampled_from(["file", "dir", "symlink", "other"]), st.integers(0, 2**63)), max_size=12
    )
)
def test_discovery_from_arbitrary_listing_never_raises(entries):
    store = stores.Store(url="/fuzz", index=0, kind="local", root="/fuzz")
    listed = [stores.Entry(rel, kind, size) for rel, kind, size in entries]
    for ours in (True, False):
        out = discovery._from_entries(store, RUN if ours else "", listed, ours=ours)
        for s in out:
            head = s.rel.split("/", 1)[-1] if ours else s.rel
            first = head.split("/", 1)[0]
            assert not first.startswith("."), s.rel  # staging, journal, trash, "..": never candidates
            assert s.kind in ("native", "torch", "dcp")
            assert s.step is None or s.step >= 0


# ----------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def plan_doc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuzz_plan") / "ck")
    state = helpers.make_state(seed=0)
    g = Guardian(stores=[root], run=RUN)
    assert g.save(state, step=100).committed and g.save(state, step=200).committed
    g.close()
    (store,), _ = planning.resolve_stores([root], None)
    doc = planning.make_plan([store], planning.PlanRequest(run=RUN, suspect="after_same_step")).to_json()
    assert len(doc["candidates"]) == 2
    return doc


def _from_json_or_clear_error(fn, doc):
    try:
        return fn(doc)
    except DistGuardianError as e:
        assert isinstance(e, ValueError) and str(e), e  # a clear, typed error (PlanFormatError)
        return None


@profile(400)
@given(data=st.data())
def test_plan_from_json_mutated_raises_clear_error(data, plan_doc):
    doc = json_mutate(data, plan_doc, max_ops=3)
    plan = _from_json_or_clear_error(planning.Plan.from_json, doc)
    if plan is None:
        return
    assert plan.to_json() == planning.Plan.from_json(plan.to_json()).to_json()  # what parses round-trips
    for c in plan.candidates:
        _check_candidate(c)


@profile(300)
@given(data=st.data())
def test_candidate_from_json_mutated_raises_clear_error(data, plan_doc):
    doc = json_mutate(data, plan_doc["candidates"][0], max_ops=3)
    c = _from_json_or_clear_error(Candidate.from_json, doc)
    if c is not None:
        _check_candidate(c)


@profile(200)
@given(data=st.data())
def test_plan_from_json_bytes_mutated(data, plan_doc):
    raw = mutate(data, json.dumps(plan_doc).encode())
    try:
        doc = json.loads(raw)
    except ValueError:
        return  # what a broadcast would refuse before from_json
    plan = _from_json_or_clear_error(planning.Plan.from_json, doc)
    if plan is not None:
        for c in plan.candidates:
            _check_candidate(c)


def _check_candidate(c: Candidate) -> None:
    assert c.tier in ("V", "L", "S", "R") and c.kind in ("native", "torch", "dcp")
    assert isinstance(c.step, int) and isinstance(c.store_index, int) and c.store_index >= 0
    parts = c.rel.split("/")
    assert c.rel and not c.rel.startswith("/") and ".." not in parts and "\x00" not in c.rel
    for f in c.files:
        assert isinstance(f.name, str) and "/" not in f.name and f.name not in (".", "..") and "\x00" not in f.name
        assert isinstance(f.size, int) and f.size >= 0


# ----------------------------------------------------------------------------- resume over fuzzed files


@pytest.fixture(scope="module")
def template(tmp_path_factory, torch_files):
    """A store with A (step 100) and B (step 200), and the snapshots of both."""
    root = str(tmp_path_factory.mktemp("fuzz_tpl") / "ck")
    saved = helpers.save_a_b([root], RUN)
    parent = tmp_path_factory.mktemp("fuzz_runs")
    outside = parent / "outside"  # a neighbour of every fuzzed store: nothing may appear or change here
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    return {"root": root, "snap_a": saved.snap_a, "snap_b": saved.snap_b, "parent": str(parent)}


def _listing(path: str) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            out[os.path.relpath(p, path)] = (st_.st_mode, st_.st_size, st_.st_mtime_ns)
    return out


B_FILES = ["manifest.json", "replicated.dgt", "rank-00000-of-00001.dgt"]


@profile(150, deadline_ms=15000)
@given(data=st.data())
def test_resume_over_fuzzed_store_loads_intact_or_fails_cleanly(data, template, torch_files, monkeypatch):
    """B's files (any of them) are fuzzed, and a fuzzed copy of the evil torch file and of B's directory
    may be planted as newer candidates. A is intact: resume must load A or B (B only when its bytes are
    intact or merely suspect-but-sane), or raise a DistGuardianError; the marker never appears; nothing
    outside the store is created or changed; every file the package opens lies inside the store."""
    parent = template["parent"]
    work = tempfile.mkdtemp(dir=parent)
    root = os.path.join(work, "ck")
    shutil.copytree(template["root"], root)
    outside_before = {k: v for k, v in _listing(parent).items() if not k.startswith(os.path.basename(work))}
    b_dir = helpers.step_dir(root, RUN, 200)
    targets = data.draw(st.lists(st.sampled_from(B_FILES), min_size=1, max_size=3, unique=True), label="fuzzed files")
    for name in targets:
        p = os.path.join(b_dir, name)
        with open(p, "rb") as f:
            raw = f.read()
        hot = 8 + struct.unpack("<Q", raw[:8])[0] if name.endswith(".dgt") and len(raw) >= 8 else None
        with open(p, "wb") as f:
            f.write(mutate(data, raw, hot=hot))
    if data.draw(st.booleans(), label="plant evil pt"):
        with open(os.path.join(root, RUN, "step_300.pt"), "wb") as f:
            f.write(mutate(data, torch_files["evil"]))
    c_fuzzed = None
    if data.draw(st.booleans(), label="plant fuzzed step dir"):
        # A copy of B named step 400 (its manifest says 200: a step_mismatch unless the manifest is
        # the fuzzed file; then its data may load as a legacy candidate, F06).
        c_dir = helpers.step_dir(root, RUN, 400)
        shutil.copytree(helpers.step_dir(template["root"], RUN, 200), c_dir)
        c_fuzzed = data.draw(st.sampled_from(B_FILES), label="fuzzed C file")
        p = os.path.join(c_dir, c_fuzzed)
        with open(p, "rb") as f:
            raw = f.read()
        with open(p, "wb") as f:
            f.write(mutate(data, raw))

    opened: list[str] = []
    real_open = os.open

    def spy_open(path, flags, *a, **k):
        opened.append(os.path.abspath(os.fsdecode(path)) if not isinstance(path, int) else str(path))
        return real_open(path, flags, *a, **k)

    state = helpers.make_state(seed=42)
    g = Guardian(stores=[root], run=RUN, timeout=30)
    with monkeypatch.context() as mp:
        mp.setattr(os, "open", spy_open)
        try:
            r = g.resume(state)
        except DistGuardianError:
            r = None
        finally:
            g.close()
    assert not torch_files["marker"].exists()
    real_root = os.path.realpath(root)
    outside = [
        p for p in opened if not os.path.realpath(p).startswith(real_root + os.sep) and os.path.realpath(p) != real_root
    ]
    assert not outside, f"opened outside the store: {outside}"
    if r is not None:
        assert r.resumed, "A is intact: a fresh start would lose progress"
        assert r.step in (100, 200, 400), r.to_json()
        if r.step == 100:
            assert helpers.same(helpers.snapshot(state), template["snap_a"])
        elif r.step == 200 and r.tier == "V":
            assert helpers.same(helpers.snapshot(state), template["snap_b"])
        elif r.step == 400:
            assert c_fuzzed is not None and r.tier in ("L", "S"), r.to_json()
            if c_fuzzed == "manifest.json":
                assert helpers.same(helpers.snapshot(state), template["snap_b"])
    outside_after = {k: v for k, v in _listing(parent).items() if not k.startswith(os.path.basename(work))}
    assert outside_after == outside_before
    shutil.rmtree(work)
