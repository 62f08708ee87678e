"""Create the automation of deployments/notify-on-failure.yaml on the current Prefect API.

    .venv/bin/python deployments/add_failure_automation.py --block slack-webhook/train-cifar-alerts

--block names an existing notification block as <block-type-slug>/<block-name>
(`prefect block ls` lists them). An automation of the same name is replaced, so
running this again after editing the YAML updates it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from prefect import get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound

SPEC = Path(__file__).with_name("notify-on-failure.yaml")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block", required=True, metavar="TYPE/NAME", help="notification block, e.g. slack-webhook/alerts")
    ap.add_argument("--file", type=Path, default=SPEC, help="automation definition (YAML)")
    args = ap.parse_args(argv)
    block_type, _, block_name = args.block.partition("/")
    if not block_name:
        ap.error(f"--block: expected <block-type-slug>/<block-name>, found {args.block!r}")

    spec = yaml.safe_load(args.file.read_text())
    with get_client(sync_client=True) as client:
        try:
            block = client.read_block_document_by_name(block_name, block_type)
        except ObjectNotFound:
            print(f"--block: no block {args.block!r} on {client.api_url}; `prefect block ls` lists them",
                  file=sys.stderr)
            return 1
        for action in spec["actions"]:
            if action["type"] == "send-notification":
                action["block_document_id"] = str(block.id)
        automation = AutomationCore.model_validate(spec)
        for old in client.read_automations_by_name(automation.name):
            client.delete_automation(old.id)
        automation_id = client.create_automation(automation)
    print(f"automation {automation.name!r} ({automation_id}) notifies through {args.block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
