"""The `circuitlab` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_models(args: argparse.Namespace) -> int:
    from patching.models import list_models

    for info in list_models():
        print(f"{info.name:24s} {'offline' if info.offline else 'online ':8s} {info.description}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from patching.models import load_model

    model = load_model(args.model)
    prompts = [("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
               ("When Tom and James went to the park, James gave a ball to", " Tom", " James"),
               ("After Lisa and Sarah went to the office, Sarah handed a book to", " Lisa", " Sarah")]
    with torch.no_grad():
        for text, io, s in prompts:
            last = model(model.to_tokens(text))[0, -1]
            diff = (last[model.to_single_token(io)] - last[model.to_single_token(s)]).item()
            print(f"logit diff {io.strip()}-{s.strip()} = {diff:+.3f}  | {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitlab", description="Activation patching and circuit discovery.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list loadable models").set_defaults(func=_cmd_models)
    demo = sub.add_parser("demo", help="run the main job on the default model")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as exc:
        print(f"circuitlab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
