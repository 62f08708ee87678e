"""Create the project's Prefect automations on the current Prefect API.

    .venv/bin/python deployments/add_automations.py --block slack-webhook/train-cifar-alerts

- deployments/crash-zombie-runs.yaml, always: flow runs whose heartbeats stop are
  marked Crashed (self-hosted servers need it; Prefect Cloud has it built in).
- deployments/notify-on-failure.yaml, with --block: a notification when a train-cifar
  flow run fails, crashes or is cancelled. --block names an existing notification
  block as <block-type-slug>/<block-name> (`prefect block ls` lists them).
- deployments/notify-on-regression.yaml, with --block: a notification when a run's
  model is worse than the champion beyond noise (the train-cifar.regression event).

An automation of the same name is replaced, so running this again after editing a
YAML file updates it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from prefect import get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound

from store.scrub import scrub

HERE = Path(__file__).parent
NOTIFY, ZOMBIES = HERE / "notify-on-failure.yaml", HERE / "crash-zombie-runs.yaml"
REGRESSION = HERE / "notify-on-regression.yaml"


def replace(client, spec: dict) -> str:
    automation = AutomationCore.model_validate(spec)
    for old in client.read_automations_by_name(automation.name):
        client.delete_automation(old.id)
    return f"{automation.name!r} ({client.create_automation(automation)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block", metavar="TYPE/NAME", help="notification block for failures, e.g. slack-webhook/alerts")
    ap.add_argument("--zombie-after", type=int, metavar="SECONDS",
                    help="mark a flow run Crashed after this long without a heartbeat (default: the YAML's; "
                         "at least twice PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    args = ap.parse_args(argv)
    zombies = yaml.safe_load(ZOMBIES.read_text())
    if args.zombie_after is not None:
        if args.zombie_after < 10:
            ap.error(f"--zombie-after: expected at least 10 seconds, found {args.zombie_after}")
        zombies["trigger"]["within"] = args.zombie_after
        zombies["actions"][0]["message"] = (f"No heartbeat from this flow run for {args.zombie_after} s: its process "
                                            "is gone (pod evicted, node lost, worker killed).")
    with get_client(sync_client=True) as client:
        print(f"automation {replace(client, zombies)} marks silent flow runs Crashed")
        if args.block:
            block_type, _, block_name = args.block.partition("/")
            if not block_name:
                ap.error(f"--block: expected <block-type-slug>/<block-name>, found {args.block!r}")
            try:
                block = client.read_block_document_by_name(block_name, block_type)
            except ObjectNotFound:
                print(f"--block: no block {args.block!r} on {scrub(str(client.api_url))}; `prefect block ls` lists them",
                      file=sys.stderr)
                return 1
            for path in (NOTIFY, REGRESSION):
                notify = yaml.safe_load(path.read_text())
                for action in notify["actions"]:
                    if action["type"] == "send-notification":
                        action["block_document_id"] = str(block.id)
                print(f"automation {replace(client, notify)} notifies through {args.block}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
