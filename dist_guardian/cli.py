"""``dist-guardian``: look at stores the way resume does, without a GPU or a process group.

``ls`` and ``plan`` import no torch (they start in milliseconds); ``verify`` reads every
byte of one checkpoint; ``prune`` is the only command that deletes, and only by the
retention rules (``--dry-run`` shows what it would delete).

Exit codes: 0 success (a plan with at least one candidate, a verified checkpoint);
1 nothing usable (no candidate, a checkpoint that is R); 2 bad usage; 3 a store could not
be reached or listed; 4 a checkpoint is suspect (S: loadable, checksums differ).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .candidate import SUSPECT_POLICIES
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ResumeConfig

EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_SUSPECT = 0, 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dist-guardian",
        description="Inspect, plan, verify and prune dist_guardian checkpoint stores.",
        epilog="Exit codes: 0 ok; 1 nothing usable (no candidate, or the checkpoint is rejected); "
        "2 bad usage; 3 a store was unreachable; 4 the checkpoint is suspect (loadable, checksum mismatch).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log decisions to stderr")
    sub = p.add_subparsers(dest="cmd", required=True)

    def stores_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("stores", nargs="+", help="store URLs: a path, file://, tmp://NAME or any fsspec URL")
        sp.add_argument("--run", default="default", help="run name (default: %(default)s)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument("--compat", default=None, help="JSON object the checkpoint's compat must match")
        sp.add_argument(
            "--storage-options",
            "--storage_options",
            default=None,
            help='JSON: {"s3://bucket": {"client_kwargs": {"endpoint_url": "..."}}}',
        )

    ls = sub.add_parser("ls", help="list every candidate with its tier and reasons")
    stores_args(ls)
    pl = sub.add_parser("plan", help="print the order resume would try, and why")
    stores_args(pl)
    pl.add_argument("--suspect", default="after_same_step", choices=SUSPECT_POLICIES)
    ve = sub.add_parser("verify", help="check one checkpoint fully (every checksum)")
    ve.add_argument("path", help="a checkpoint directory (local path or URL)")
    ve.add_argument("--json", action="store_true")
    ve.add_argument("--storage-options", "--storage_options", default=None)
    pr = sub.add_parser("prune", help="delete old verified checkpoints by the retention rules")
    stores_args(pr)
    pr.add_argument("--keep-last", "--keep_last", type=int, required=True)
    pr.add_argument("--dry-run", "--dry_run", action="store_true")
    be = sub.add_parser("bench", help="measure raw and dist_guardian save/load throughput on a store")
    be.add_argument("store", help="a store URL (local dir, s3://..., any fsspec URL)")
    be.add_argument("--size-mb", "--size_mb", type=int, default=256, help="bytes per run (default %(default)s MiB)")
    be.add_argument("--runs", type=int, default=3)
    be.add_argument("--concurrency", type=int, default=1, help="parallel ranged GETs for remote loads")
    be.add_argument("--json", action="store_true")
    be.add_argument(
        "--plot",
        default=None,
        help="also measure time against size and tensor count (with torch and safetensors on a local store) "
        "and write the plot (PNG) here; needs matplotlib (the plot extra)",
    )
    be.add_argument("--storage-options", "--storage_options", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        opts = json.loads(args.storage_options) if getattr(args, "storage_options", None) else None
        compat = json.loads(args.compat) if getattr(args, "compat", None) else None
    except ValueError as e:
        print(f"dist-guardian: bad JSON argument: {e}", file=sys.stderr)
        return EXIT_USAGE
    from .config import ResumeConfig

    try:
        if args.cmd == "verify":
            return _verify(args, opts)
        if args.cmd == "bench":
            from . import bench

            return bench.main(args)
        # The run name ("../x" would list or prune outside the store), the stores and their options
        # are checked by the same config a resume builds.
        config = ResumeConfig(
            stores=tuple(args.stores),
            run=args.run,
            compat=compat,
            storage_options=opts,
            suspect=getattr(args, "suspect", "after_same_step"),
        )
        if args.cmd in ("ls", "plan"):
            return _ls_plan(args, config)
        return _prune(args, config)
    except ConfigError as e:
        print(f"dist-guardian: {e}", file=sys.stderr)
        return EXIT_USAGE


def _ls_plan(args: argparse.Namespace, config: ResumeConfig) -> int:
    from . import planning

    store_list, refused = planning.resolve_stores(config.stores, config.storage_options)
    request = planning.PlanRequest(run=config.run, compat=config.compat, suspect=config.suspect)
    plan = planning.make_plan(store_list, request, refused=refused, include_rejected=args.cmd == "ls")
    rows = plan.listing if args.cmd == "ls" else plan.candidates
    if args.json:
        doc = plan.to_json()
        doc["listing"] = [c.to_json() for c in plan.listing]
        print(json.dumps(doc, indent=2))
    else:
        title = "candidates" if args.cmd == "ls" else "resume would try, in this order"
        print(f"run {args.run}: {title}")
        if not rows:
            print("  (none)")
        for i, c in enumerate(rows):
            why = f"  [{'; '.join(c.reasons)}]" if c.reasons else ""
            lead = f"{i + 1:>3}." if args.cmd == "plan" else "   "
            print(
                f"{lead} step {c.step:>10}  gen {c.generation:<3} tier {c.tier}  {c.kind:<6} {c.path}{_shape(c)}{why}"
            )
        for url, why in plan.unreachable:
            print(f"  store {url}: UNREACHABLE: {why}")
        for w in plan.warnings:
            print(f"  warning: {w}")
    if plan.unreachable:
        return EXIT_UNREACHABLE
    return EXIT_OK if plan.candidates else EXIT_NOTHING


def _verify(args: argparse.Namespace, opts: Any) -> int:
    from . import stores, verify
    from .errors import StoreError

    path = args.path.rstrip("/")
    if path.startswith("tmp://"):
        # tmp://NAME/<run>/<dir>: the node-local store NAME (its root is resolved and checked, F48).
        name, _, rel = path[len("tmp://") :].partition("/")
        parts = rel.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
            raise ConfigError(f"{args.path}: give tmp://NAME/<run>/<checkpoint dir>")
        try:
            store = stores.resolve(_checked(f"tmp://{name}", opts), 0, opts)
        except StoreError as e:  # an insecure node-local root (F48): refused, not followed
            print(f"dist-guardian: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
    elif "://" in path and not path.startswith("file://"):
        proto, _, rest = path.partition("://")
        parent, _, name = rest.rpartition("/")
        parent, _, run = parent.rpartition("/")
        store = stores.resolve(_checked(f"{proto}://{parent}", opts), 0, opts)
        rel = f"{run}/{name}"
    else:
        local = path[len("file://") :] if path.startswith("file://") else path
        local = os.path.abspath(local)
        if _foreign(local):
            return _verify_foreign(args, local)
        store = stores.resolve(_checked(os.path.dirname(os.path.dirname(local)), opts), 0, opts)
        rel = f"{os.path.basename(os.path.dirname(local))}/{os.path.basename(local)}"
    tier, reasons = verify.verify_full(store, rel)
    layout = _written_layout(store, rel)
    if args.json:
        print(json.dumps({"path": args.path, "tier": tier, "reasons": reasons, **layout}, indent=2))
    else:
        print(f"{args.path}: tier {tier}" + ("" if reasons else " (every checksum matches)"))
        if layout:
            print(
                f"  written by {layout['world_size']} ranks; sharded: {layout['sharded_tensors']} tensors in "
                f"{layout['chunks']} chunks over {layout['shard_files']} shard files"
            )
        for r in reasons:
            print(f"  {r}")
    return {"V": EXIT_OK, "L": EXIT_OK, "S": EXIT_SUSPECT}.get(tier, EXIT_NOTHING)


def _shape(c: Any) -> str:
    """For a sharded checkpoint, `` ws=N shards=K``: the world size that wrote it and its shard files."""
    from .layout import SHARD_FILE_RE

    shards = sum(1 for f in c.files if SHARD_FILE_RE.match(f.name))
    return f"  ws={c.world_size} shards={shards}" if shards else ""


def _written_layout(store: Any, rel: str) -> dict[str, Any]:
    """World size and chunk counts of a sharded checkpoint ({} for another, or one without a manifest that parses)."""
    from . import manifest, stores
    from .errors import DistGuardianError

    try:
        mf = manifest.parse(stores.read_small(store, f"{rel}/{manifest.MANIFEST_NAME}", manifest.MAX_MANIFEST_BYTES))
    except (OSError, DistGuardianError):
        return {}
    if not mf.sharded:  # the world size matters to a reader only when tensors are resharded
        return {}
    return {
        "world_size": mf.world_size,
        "sharded_tensors": len(mf.sharded),
        "chunks": sum(len(t.chunks) for t in mf.sharded.values()),
        "shard_files": len({c.file for t in mf.sharded.values() for c in t.chunks}),
    }


def _foreign(local: str) -> bool:
    """A file (torch.save, Lightning .ckpt, safetensors) or a DCP directory: not one of our step dirs."""
    from .layout import DCP_METADATA, MANIFEST_NAME

    if os.path.isfile(local):
        return True
    return os.path.isfile(os.path.join(local, DCP_METADATA)) and not os.path.exists(os.path.join(local, MANIFEST_NAME))


def _verify_foreign(args: argparse.Namespace, local: str) -> int:
    if os.path.isdir(local):
        from .foreign_loading import full_check_dcp

        tier, reasons = full_check_dcp(local)
    else:
        from .verify_foreign import full_check

        tier, reasons = full_check(local)
    if args.json:
        print(json.dumps({"path": args.path, "tier": tier, "reasons": reasons}, indent=2))
    else:
        print(f"{args.path}: tier {tier}")
        for r in reasons:
            print(f"  {r}")
    return {"V": EXIT_OK, "L": EXIT_OK, "S": EXIT_SUSPECT}.get(tier, EXIT_NOTHING)


def _checked(store_url: str, opts: Any) -> str:
    """The store a checkpoint path names, with ``--storage-options`` checked by the resume config."""
    from .config import ResumeConfig

    ResumeConfig(stores=(store_url,), storage_options=opts)
    return store_url


def _prune(args: argparse.Namespace, config: ResumeConfig) -> int:
    """Retention as the library runs it: the first store is the primary, the others its mirrors (F42).

    Without live state, every (compat, layout) group is pruned on its own; ``--compat`` restricts to that compat.
    """
    from . import planning, retention

    store_list, refused = planning.resolve_stores(config.stores, config.storage_options)
    out: dict[str, Any] = {}
    for i, s in enumerate(store_list):
        out[s.url] = retention.retain(
            s,
            config.run,
            args.keep_last,
            dry_run=args.dry_run,
            compat=config.compat,
            mirrors=store_list[1:] if i == 0 else [],
        )
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "deleted": out, "refused": refused}, indent=2))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        for url, paths in out.items():
            print(f"{url}: {verb} {len(paths)}")
            for p in paths:
                print(f"  {p}")
    return EXIT_UNREACHABLE if refused else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
