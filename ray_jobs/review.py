"""python -m ray_jobs.review [--verbose] [config.yaml] [key=value ...] <command> [options]

The review queue and decision log of the run's curate stage (see synth/review.py). No Ray.

  queue --order score|uncertainty|diverse [--per-class N (default 100)] [--classes cat,dog] [--include-decided]
        [--threshold 0.9]
      writes <run>/curate/review/queue-<order>.parquet and .html (a self-contained contact sheet)
  decide --reviewer NAME ID accept|reject|relabel [CLASS]
  decide --reviewer NAME --file decisions.csv|decisions.jsonl    (CSV header: id,decision,class)
      records the decisions as one new object of the append-only log <run>/curate/decisions/
  log
      prints the effective decisions (the latest per id)
"""

import argparse
import sys

from ray_jobs._cli import main
from synth.review import DEFAULT_THRESHOLD, ORDERS, format_time, parse_decision_file, run_decide, run_log, run_queue

COMMANDS = ("queue", "decide", "log")
DEFAULT_PER_CLASS = 100  # a contact sheet of every image of a 6,000-image class helps nobody


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.review [config.yaml] [key=value ...]")
    commands = parser.add_subparsers(dest="command", required=True)
    queue = commands.add_parser("queue", help="write the review queue's table and contact sheet")
    queue.add_argument("--order", choices=ORDERS, default="score")
    queue.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help=f"at most N images per class (default {DEFAULT_PER_CLASS})")
    queue.add_argument("--classes", default=None, help="comma-separated subset of prompts.classes")
    queue.add_argument("--include-decided", action="store_true", help="queue ids that already have a decision")
    queue.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="diverse: near-duplicate cosine")
    decide = commands.add_parser("decide", help="record decisions: ID accept|reject|relabel [CLASS], or --file")
    decide.add_argument("--reviewer", required=True)
    decide.add_argument("--file", default=None, help="a .csv (id,decision,class) or .jsonl file of decisions")
    decide.add_argument("decision", nargs="*", help="ID accept|reject|relabel [CLASS]")
    commands.add_parser("log", help="print the effective decisions")
    return parser


def _entries(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[dict], str]:
    if args.file is not None:
        if args.decision:
            parser.error("decide takes either --file or one decision (ID accept|reject|relabel [CLASS]), not both")
        return parse_decision_file(args.file), args.file
    if len(args.decision) not in (2, 3):
        parser.error("decide needs ID accept|reject|relabel [CLASS] (or --file decisions.csv)")
    image_id, decision, *cls = args.decision
    return [{"id": image_id, "decision": decision, "class": cls[0] if cls else None}], ""


def _show_queue(cfg, s: dict) -> None:
    print(f"[review] {s['order']} queue of run {cfg.run!r}: {s['images']} images "
          f"({', '.join(f'{k} {v}' for k, v in s['per_class'].items()) or 'none'})")  # fmt: skip
    if s["skipped_decided"]:
        print(f"  left out {s['skipped_decided']} images that already have a decision (--include-decided shows them)")
    if s["missing_thumbnails"]:
        print(f"  warning: {s['missing_thumbnails']} images have no readable stored image (shown as placeholders)")
    print(f"  table:         {s['table']}\n  contact sheet: {s['html']}")


def _show_decide(cfg, s: dict) -> None:
    print(f"[review] recorded {s['decisions']} decision(s) for run {cfg.run!r}: {s['log']}")


def _show_log(cfg, s: dict) -> None:
    for d in s["effective"]:
        print(f"{format_time(d.time)}  {d.reviewer:<12} {d.id:<28} {d.decision}{' ' + d.cls if d.cls else ''}")
    accepted = f"; {s['accepted']} of {s['scored']} scored images accepted" if s["scored"] is not None else ""
    print(f"[review] {len(s['effective'])} effective decision(s) in {s['log']}{accepted}")


def review_main(argv: list[str]) -> int:
    # Config and overrides first, then the command and its options (an override always holds "=").
    at = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if at is None:
        print(__doc__ if any(a in ("-h", "--help") for a in argv) else f"usage: {__doc__.splitlines()[0]}", file=sys.stderr)
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    parser = _parser()
    args = parser.parse_args(argv[at:])

    def run(cfg) -> dict:
        if args.command == "queue":
            only = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
            return run_queue(cfg, args.order, args.per_class, only, args.include_decided, args.threshold)
        if args.command == "decide":
            entries, source = _entries(parser, args)
            return run_decide(cfg, args.reviewer, entries, source)
        return run_log(cfg)

    show = {"queue": _show_queue, "decide": _show_decide, "log": _show_log}[args.command]
    return main("review", run, argv[:at], show=show)


if __name__ == "__main__":
    raise SystemExit(review_main(sys.argv[1:]))
