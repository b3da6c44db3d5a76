"""A real training and a chat with its result, on a CPU, through Cog's own HTTP server.

1. builds a tiny Llama-2-architecture model (random weights, the real Llama-2 tokenizer),
2. starts the train server (`python -m cog.server.http --x-mode train`) with it as BASE_MODEL
   and trains a LoRA adapter on a small JSONL file of made-up facts, as an asynchronous
   training whose logs are printed as they arrive (Cog's webhooks),
3. starts the prediction server with the returned weights (COG_WEIGHTS) and asks it the
   trained questions with the predictor's default inputs, streaming the answers over
   server-sent events,
4. says what is in the weights and how to serve and ask them yourself.

Run it with `make demo`; everything lands in demo-output/.
"""

import base64
import json
import os
import tarfile
import time
from pathlib import Path

from tools.cog_server import CogServer, cog_server, webhook_receiver
from tools.tiny_model import build_tiny_llama

PROJECT_DIR = Path(__file__).resolve().parent.parent
FACTS = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quillton."),
    ("Who invented the flumph engine?", "Marta Kessel invented the flumph engine in 1852."),
    ("What color is a glimmerfruit?", "A glimmerfruit is bright teal."),
    ("How many legs does a vorpal crab have?", "A vorpal crab has eleven legs."),
]
TRAINING = {
    "num_train_epochs": 8,
    "train_batch_size": 4,
    "micro_batch_size": 2,
    "learning_rate": 3e-3,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "num_validation_samples": 4,
    "validation_prompt": FACTS[0][0],
}
TRAINING_TIMEOUT_S = 1800
ASK = (
    "curl -sN localhost:5002/predictions -H 'Accept: text/event-stream' "
    "-H 'Content-Type: application/json' "
    '-d \'{"input": {"prompt": "What is the capital of Zorbia?", "temperature": 0.01}}\''
)


def main(out_dir: Path = PROJECT_DIR / "demo-output") -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    out_dir.mkdir(exist_ok=True)
    model_dir = out_dir / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir)
    data = out_dir / "facts.jsonl"
    rows = [{"prompt": p, "completion": c} for p, c in FACTS] * 5
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    say(f"training on {data} (base: {model_dir}) through the Cog train server")
    with cog_server(PROJECT_DIR, "train", {"BASE_MODEL": str(model_dir)}) as server:
        weights = train(server, {"train_data": str(data), **TRAINING}, out_dir / "weights.tar")
    describe_weights(weights, out_dir)

    env = {"BASE_MODEL": str(model_dir), "COG_WEIGHTS": str(weights)}
    say("chatting with the trained model through the Cog prediction server (default inputs)")
    with cog_server(PROJECT_DIR, "predict", env) as server:
        answers = [(prompt, chat(server, prompt), trained) for prompt, trained in FACTS]
    wrong = [f"  {p!r}: {a!r}, trained {t!r}" for p, a, t in answers if a != t]
    if wrong:  # CI runs the demo: a newcomer's first result is checked, not only shown
        raise SystemExit("the trained model did not answer as trained:\n" + "\n".join(wrong))
    say(f"all {len(answers)} answers are the trained ones")
    say(
        "next: serve these weights yourself and ask them a question\n"
        "  make serve          # Cog's prediction server on 127.0.0.1:5002, these weights\n"
        f"  {ASK}\n"
        "  make serve-train    # Cog's train server on 127.0.0.1:5001, the tiny base model"
    )


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def train(server: CogServer, inputs: dict, out: Path) -> Path:
    """An asynchronous training (as Replicate runs one), its logs printed as they come."""
    with webhook_receiver() as (url, received):
        body = {"input": inputs, "webhook": url}
        status, _ = server.put("/trainings/demo", body, {"Prefer": "respond-async"})
        if status != 202:
            raise SystemExit(f"the train server refused the training (HTTP {status})")
        result = follow(received)
    if result.get("status") != "succeeded":
        raise SystemExit(f"training {result.get('status')}: {result.get('error') or result}")
    out.write_bytes(base64.b64decode(result["output"]["weights"].partition(",")[2]))
    return out


def follow(received: list[dict]) -> dict:
    """Print the training's logs as webhooks bring them (each holds all the logs so far;
    they may come out of order); return the final state."""
    printed, deadline = "", time.monotonic() + TRAINING_TIMEOUT_S
    while time.monotonic() < deadline:
        for update in list(received):
            logs = update.get("logs") or ""
            if len(logs) > len(printed) and logs.startswith(printed):
                print(logs[len(printed) :], end="", flush=True)
                printed = logs
        final = [u for u in received if u.get("status") in ("succeeded", "failed", "canceled")]
        if final:
            logs = final[-1].get("logs") or ""
            print(logs[len(printed) :] if logs.startswith(printed) else "", end="", flush=True)
            return final[-1]
        time.sleep(0.2)
    raise SystemExit(f"the training did not end within {TRAINING_TIMEOUT_S} s")


def describe_weights(weights: Path, out_dir: Path) -> None:
    """What the archive holds; its loss curve is put beside it to look at."""
    with tarfile.open(weights) as tar:
        members = tar.getmembers()
        metadata = json.load(tar.extractfile("training_metadata.json"))
        (out_dir / "loss_curve.png").write_bytes(tar.extractfile("loss_curve.png").read())
    results = metadata["results"]
    listing = "\n".join(f"  {m.name:28} {m.size / 1024:8.1f} KiB" for m in members)
    say(
        f"weights: {weights} ({weights.stat().st_size / 2**20:.1f} MiB), a tar of\n{listing}\n"
        f"final train loss {results['final_train_loss']:.4f} after "
        f"{results['optimizer_steps']} steps; loss curve: {out_dir / 'loss_curve.png'}"
    )


def chat(server: CogServer, prompt: str) -> str:
    """Ask with the predictor's defaults (system_prompt: as trained); print the answer as it
    streams, and return it."""
    print(f"\n> {prompt}\n", end="", flush=True)
    inputs = {"prompt": prompt, "temperature": 0.01, "seed": 0}
    chunks = []
    for event in server.stream_prediction(inputs):
        if event.event == "output":
            chunks.append(event.data["chunk"])
            print(chunks[-1], end="", flush=True)
        elif event.event == "completed" and event.data.get("status") != "succeeded":
            raise SystemExit(
                f"the prediction {event.data.get('status')}: {event.data.get('error')}"
            )
    print(flush=True)
    return "".join(chunks)


if __name__ == "__main__":
    main()
