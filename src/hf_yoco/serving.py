"""`hf-yoco serve`: transformers' OpenAI-compatible server (`transformers serve`) for hf_yoco checkpoints.

`transformers serve` loads a checkpoint's model class by name from the `transformers` namespace
(`getattr(transformers, config.architectures[0])`), so it cannot load a model type transformers does not ship, not even
with `--trust-remote-code`. `hf-yoco serve` is `transformers serve` with every option unchanged, after two steps:
`import hf_yoco` (registers the configs and models with the Auto classes and the continuous-batching allocators) and
`expose_to_transformers()` (puts our model classes into that namespace). transformers >= 5.25 loads each model in
a process of its own (spawned, so it starts from a fresh interpreter): there `SpawnedModelLoader`, the server's loader
with these two steps first, does the same. With `--continuous-batching` the requests share transformers' paged
engine (`hf_yoco.continuous_batching`).

    hf-yoco serve ./my-yoco --continuous-batching --device cpu --port 8000
    # then any OpenAI client: base_url="http://localhost:8000/v1", model="./my-yoco"

Chat completions need a chat template in the checkpoint's tokenizer; `/v1/completions` takes raw text.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import unittest.mock

# The classes `transformers serve` may find in a checkpoint's `architectures`.
SERVABLE = ("YocoForCausalLM", "YocoModel", "BlockTransformerForCausalLM", "BlockTransformerModel")


def expose_to_transformers() -> list[str]:
    """Make hf_yoco's model classes attributes of the `transformers` module (where `transformers serve` looks them up);
    returns the names added. Names transformers already defines are left alone."""
    import transformers

    import hf_yoco

    added = []
    for name in SERVABLE:
        if not hasattr(transformers, name):
            setattr(transformers, name, getattr(hf_yoco, name))
            added.append(name)
    return added


try:  # transformers >= 5.25 (earlier releases load the model in the server's process, already set up by `run`)
    from transformers.cli.serving.model_manager import ModelLoader
except ImportError:  # an older release, or no serving extras (`run` says so)
    ModelLoader = None

if ModelLoader is not None:

    class SpawnedModelLoader(ModelLoader):
        """transformers' model loader, pickled into the model's spawned process, where hf_yoco is imported and its
        classes exposed before the model loads (unpickling this class imports this module)."""

        def load_model_and_processor(self, *args, **kwargs):
            expose_to_transformers()
            return super().load_model_and_processor(*args, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "hf-yoco serve [MODEL] [transformers serve options]"
    parser.description = (
        "transformers' OpenAI-compatible server (`transformers serve`, same options) able to load hf_yoco "
        "checkpoints. `hf-yoco serve -- --help` lists the options; e.g. `hf-yoco serve ./ckpt --continuous-batching "
        "--device cpu --port 8000`."
    )
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="arguments of `transformers serve`")


def run(args: argparse.Namespace) -> int:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ImportError("hf-yoco serve needs transformers' serving extras: pip install 'hf-yoco[serve]'")
    expose_to_transformers()
    serve_args = [a for a in args.serve_args if a != "--"]
    try:  # typer prints its own errors (a bad option: exit 2)
        _serve_app()(args=serve_args, prog_name="hf-yoco serve")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0
    return 0


def _serve_app():
    """`transformers serve` as a one-command typer app whose server also stops its batching engine on exit.

    transformers' server shuts its model manager down when uvicorn stops, but not the continuous-batching engine,
    whose worker thread then keeps the process alive after Ctrl-C (a stock Llama too). The upstream fix is one line
    in `transformers.cli.serving.server.build_server`'s lifespan: `generation_state.shutdown()`.
    """
    import typer
    from transformers.cli.serve import Serve

    class StoppingServe(Serve):
        __doc__ = Serve.__doc__

        @functools.wraps(Serve.__init__)  # typer reads the options from this signature
        def __init__(self, *args, **kwargs) -> None:
            loader = contextlib.nullcontext()
            if ModelLoader is not None:  # `Serve` imports the loader class when it builds the server
                loader = unittest.mock.patch("transformers.cli.serving.model_manager.ModelLoader", SpawnedModelLoader)
            try:
                with loader:
                    super().__init__(*args, **kwargs)  # returns when the server has stopped
            except KeyboardInterrupt:  # Ctrl-C / SIGINT: uvicorn has already shut the server down cleanly
                print("hf-yoco serve: stopped", file=sys.stderr)
            finally:
                if getattr(self, "_generation_state", None) is not None:
                    self._generation_state.shutdown()

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name="serve")(StoppingServe)
    return app
