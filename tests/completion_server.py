"""A small OpenAI-compatible completion server over model.generate, for tests: it stands where vLLM stands.

    python tests/completion_server.py --model CHECKPOINT_FOLDER --port 8123 [--served-model-name NAME]

GET /v1/models lists the one model; POST /v1/completions takes vLLM's fields (prompt text, n, max_tokens,
temperature, top_p, top_k, seed, stop_token_ids) and returns choices with text and finish_reason ("stop" when a
stop id ended the reply, which is left out of the text, as vLLM does; "length" when max_tokens cut it). The prompt
text is tokenized with the checkpoint's own tokenizer, as a server would. One request at a time (a lock): the test
checks what is sampled, not throughput.
"""
import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import generate, load, load_tokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", help="default: the --model string, as vLLM does")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    name, lock = args.served_model_name or args.model, threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self.reply(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            self.reply(404, {"error": "not found"})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/completions" or request.get("model") != name:
                return self.reply(404, {"error": f"no model {request.get('model')!r} at {self.path}"})
            ids = tokenizer.encode(request["prompt"], add_special_tokens=False).ids
            stop = tuple(request.get("stop_token_ids") or ())
            with lock:
                rows = generate(model, [ids], request["max_tokens"], temperature=request.get("temperature", 1.0),
                                top_k=request.get("top_k", 0), top_p=request.get("top_p", 1.0), stop_ids=stop,
                                num_samples=request.get("n", 1), seed=request.get("seed") or 0)
            choices = []
            for i, row in enumerate(rows):
                finished = bool(row) and row[-1] in stop
                text = tokenizer.decode(row[:-1] if finished else row, skip_special_tokens=False)
                choices.append({"index": i, "text": text, "finish_reason": "stop" if finished else "length"})
            self.reply(200, {"object": "text_completion", "model": name, "choices": choices})

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
