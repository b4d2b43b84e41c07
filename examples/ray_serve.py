"""More than one board's worth of requests: replicas of edgephi's OpenAI server behind Ray Serve.

Ray Serve (pip install "ray[serve]") runs N replicas of a deployment, each a process with its own
loaded model, and its HTTP proxy balances requests across them: the same /v1/chat/completions,
/v1/completions and /v1/models as `edgephi serve`, on Ray's port. On one machine give each replica
a share of the cores (threads); across machines, start Ray on each and the replicas spread.

    python examples/ray_serve.py [MODEL] [--replicas 2] [--threads 1] [--port 8000]

Tested with Ray 2.60.0 on one machine (tests/test_ray_serve.py: two replicas, the openai client,
greedy replies equal to `edgephi chat`'s, streaming included).
"""

from __future__ import annotations

import argparse
import time


def application(model_path: str, *, replicas: int = 2, threads: int = 1, model_id: str | None = None,
                max_sessions: int = 4):
    """The Ray Serve application: `replicas` copies of edgephi's Starlette app, each loading the model
    in its own process when Ray starts it."""
    from ray import serve

    def build():  # runs in each replica
        import edgephi
        from edgephi.server import create_app

        model = edgephi.load(model_path, threads=threads)
        model.backend.prepare_batching()
        return create_app(model, model_id=model_id, max_sessions=max_sessions)

    return serve.deployment(serve.ingress(build)(), name="edgephi", num_replicas=replicas,
                            ray_actor_options={"num_cpus": threads}).bind()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="[default: the default model]")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per replica")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    import ray
    from ray import serve

    if args.model is None:
        from edgephi.default_model import ensure_default_model

        args.model = str(ensure_default_model(print))
    ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(args.model, replicas=args.replicas, threads=args.threads), name="edgephi",
              route_prefix="/")
    print(f"{args.replicas} replicas of {args.model} at http://{args.host}:{args.port}/v1; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
