"""The champions of a store: show them, list their history, roll one back.

    python -m cli.champion --store s3://bucket/nightly                 # each dataset's champion
    python -m cli.champion --store S history [--dataset IDENTITY]     # every change, oldest first
    python -m cli.champion --store S rollback --to RUN_ID [--dataset IDENTITY] [--reason TEXT]
    python -m cli.champion --store S trend [--dataset IDENTITY]       # night over night, oldest first

A rollback makes an earlier champion of a dataset identity its champion again, by
the same conditional write as a promotion (registry/champions.py), and is itself
recorded in the history.
"""
from __future__ import annotations

import argparse
import getpass
import socket
import sys

from store import StoreError, join_key, open_store, require_conditional_writes
from registry import champions, trends


def _score(rec: dict | None) -> str:
    return "-" if rec is None else f"{rec['test']['accuracy']:.4f}"


def show(docs: dict) -> list[str]:
    if not docs:
        return ["no champion yet"]
    return [f"{ident}\t{d['champion']['run_id']}\t{_score(d['champion'])}\t{d['champion'].get('model_uri', '')}"
            for ident, d in docs.items()]


def history(docs: dict) -> list[str]:
    # by time, then identity; entries of one identity in the same millisecond keep their history order
    rows = sorted(((e["at"], ident, e) for ident, d in docs.items() for e in d["history"]), key=lambda r: r[:2])
    return [f"{at}\t{ident}\t{e['action']}\t{(e['previous'] or {}).get('run_id', '-')} ({_score(e['previous'])}) -> "
            f"{e['champion']['run_id']} ({_score(e['champion'])})\t{e['reason']}\t"
            f"{e.get('flow_run_id') or e.get('by') or '-'}" for at, ident, e in rows]


def trend_lines(store, asked: str | None) -> list[str]:
    """A dataset identity's trend (registry/trends.py) as a table, oldest first."""
    import pandas as pd

    from tasks.trend import table

    ident = pick_identity(dict.fromkeys(trends.identities(store)), asked, "trend")
    summary, entries = trends.read(store, ident)
    lines = [f"dataset {ident}: {len(entries)} run(s)"]
    if summary:
        lines.append(f"before them, dropped for age and counted: {summary['entries']} run(s) from {summary['first']} "
                     f"to {summary['last']}, {summary['promoted']} promoted, {summary['regressions']} regression(s), "
                     f"by status {summary['by_status']}")
    rows = list(reversed(table(entries)))
    return [*lines, pd.DataFrame(rows).to_string(index=False) if rows else "no runs recorded yet"]


def pick_identity(docs: dict, asked: str | None, what: str = "champion") -> str:
    if asked is not None:
        if asked not in docs:
            raise LookupError(f"--dataset {asked}: no {what} of that identity; known: {', '.join(docs) or 'none'}")
        return asked
    if len(docs) != 1:
        raise LookupError(f"--dataset: give the dataset identity, one of: {', '.join(docs) or 'none'}")
    return next(iter(docs))


def who() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no USER variable and no passwd entry (a container)
        user = "unknown"
    return f"{user}@{socket.gethostname()} (python -m cli.champion)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cli.champion", description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="a local folder or s3://bucket/prefix")
    sub = ap.add_subparsers(dest="command")
    h = sub.add_parser("history", help="every champion change, oldest first")
    h.add_argument("--dataset", default=None, metavar="IDENTITY", help="only this dataset identity's")
    r = sub.add_parser("rollback", help="make an earlier champion the champion again")
    r.add_argument("--to", required=True, metavar="RUN_ID", help="an earlier champion of the dataset identity")
    r.add_argument("--dataset", default=None, metavar="IDENTITY", help="needed when the store has several")
    r.add_argument("--reason", default="rolled back by hand", help="recorded in the history")
    t = sub.add_parser("trend", help="a dataset identity's runs night by night, oldest first")
    t.add_argument("--dataset", default=None, metavar="IDENTITY", help="needed when the store has several")
    args = ap.parse_args(argv)
    try:
        store = open_store(args.store, must_exist=True)
        if args.command == "rollback":  # a compare-and-swap
            require_conditional_writes(store, join_key(champions.FOLDER, "probe", "conditional-writes"))
        if args.command == "trend":
            print("\n".join(trend_lines(store, args.dataset)))
            return 0
        docs = champions.documents(store)
        if args.command == "history":
            if args.dataset is not None:
                docs = {pick_identity(docs, args.dataset): docs[args.dataset]}
            lines = history(docs) or ["no champion change recorded yet"]
        elif args.command == "rollback":
            ident = pick_identity(docs, args.dataset)
            e = champions.rollback(store, ident, args.to, args.reason, by=who())
            lines = [f"{ident}: champion {e['previous']['run_id']} -> {e['champion']['run_id']} ({e['reason']})"]
        else:
            lines = show(docs)
    except (OSError, ValueError, LookupError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
