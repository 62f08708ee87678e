"""Upload a local CIFAR-10 archive to an S3 mirror, for workers without internet.

    python -m cli.mirror cifar-10-python.tar.gz s3://bucket/mirror/cifar-10-python.tar.gz

The archive is decoded first, so a truncated or foreign file never reaches the
mirror. It prints the archive's MD5 and URI; a run then takes it with
`--data-source URI` (plus `--data-md5 MD5` unless it is the official archive).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnn import data as cd
from store import StoreError, parse_uri


def mirror(archive: Path, target: str) -> tuple[str, str]:
    """(md5, uri)."""
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise FileNotFoundError(f"ARCHIVE {archive}: no such file")
    try:  # the store's own rules: a valid bucket, a key with no '..' or empty parts
        bucket, key = parse_uri(target.removesuffix("/") + "/" + cd.ARCHIVE_NAME if target.endswith("/") else target)
        if not key:
            raise ValueError(f"{target!r}: no key")
    except ValueError as e:
        raise ValueError(f"TARGET {target!r}: expected s3://bucket/key (e.g. s3://bucket/mirror/{cd.ARCHIVE_NAME}): "
                         f"{str(e).removeprefix(repr(target) + ': ')}") from None
    decoded = cd.decode(archive)
    print(f"{archive}: {len(decoded['train_y'])} training and {len(decoded['holdout_y'])} hold-out images, "
          f"classes {', '.join(decoded['classes'])}", file=sys.stderr)
    md5 = cd.md5_of(archive)

    from store.s3 import S3Store  # boto3 only here

    info = S3Store(f"s3://{bucket}").put_file(key, archive)
    return md5, info["uri"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cli.mirror", description=__doc__.split("\n")[0])
    ap.add_argument("archive", type=Path, metavar="ARCHIVE", help=f"a local {cd.ARCHIVE_NAME} (or a CIFAR-format one)")
    ap.add_argument("target", metavar="TARGET", help="s3://bucket/key to upload it to (a key ending in / gets the "
                                                     "archive's name)")
    args = ap.parse_args(argv)
    try:
        md5, uri = mirror(args.archive, args.target)
    except (OSError, ValueError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    official = md5 == cd.ARCHIVE_MD5
    print(f"md5 {md5}{' (the official CIFAR-10 archive)' if official else ''}")
    print(f"uri {uri}")
    print(f"use: --data-source {uri}" + ("" if official else f" --data-md5 {md5}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
