"""A real training and a chat with its result, on a CPU, through Cog's own HTTP server.

1. builds a tiny Llama-2-architecture model (random weights, the real Llama-2 tokenizer),
2. starts the train server (`python -m cog.server.http --x-mode train`) with it as BASE_MODEL
   and trains a LoRA adapter on a small JSONL file of made-up facts,
3. starts the prediction server with the returned weights (COG_WEIGHTS) and asks it the
   trained questions, streaming the answers over server-sent events.

Run it with `make demo`; everything lands in demo-output/.
"""

import base64
import json
import os
from pathlib import Path

from tools.cog_server import CogServer, cog_server
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


def main(out_dir: Path = PROJECT_DIR / "demo-output") -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    out_dir.mkdir(exist_ok=True)
    model_dir = out_dir / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir)
    data = out_dir / "facts.jsonl"
    rows = [{"prompt": p, "completion": c} for p, c in FACTS] * 5
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(f"== training on {data} (base: {model_dir}) through the Cog train server", flush=True)
    with cog_server(PROJECT_DIR, "train", {"BASE_MODEL": str(model_dir)}) as server:
        weights = train(server, {"train_data": str(data), **TRAINING}, out_dir / "weights.tar")
    print(f"== weights: {weights} ({weights.stat().st_size / 2**20:.1f} MiB)", flush=True)

    env = {"BASE_MODEL": str(model_dir), "COG_WEIGHTS": str(weights)}
    print("== chatting with the trained model through the Cog prediction server", flush=True)
    with cog_server(PROJECT_DIR, "predict", env) as server:
        for prompt, _ in FACTS:
            chat(server, prompt)


def train(server: CogServer, inputs: dict, out: Path) -> Path:
    status, result = server.post("/trainings", {"input": inputs}, timeout=1800)
    print(result.get("logs", ""), flush=True)
    if status != 200 or result.get("status") != "succeeded":
        raise SystemExit(f"training failed: {result.get('error') or result}")
    out.write_bytes(base64.b64decode(result["output"]["weights"].partition(",")[2]))
    return out


def chat(server: CogServer, prompt: str) -> None:
    print(f"\n> {prompt}\n", end="", flush=True)
    inputs = {"prompt": prompt, "system_prompt": "", "temperature": 0.01, "seed": 0}
    for event in server.stream_prediction(inputs):
        if event.event == "output":
            print(event.data["chunk"], end="", flush=True)
    print(flush=True)


if __name__ == "__main__":
    main()
