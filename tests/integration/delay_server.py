"""A tiny OpenAI-style completions server whose speed is set, for regression tests of campaigns.

    python3 delay_server.py HOST PORT PREFILL_MS TOKEN_MS

Every prompt word is a token (``usage.prompt_tokens``); the first token comes after
``PREFILL_MS``, each further one ``TOKEN_MS`` after the previous, exactly ``max_tokens`` of
them, streamed as server-sent events with a final usage chunk when asked for. Standard library
only, so any ``python3`` runs it as a ``command`` engine. Sleeps, not work: its figures hold on
a busy machine, and a server 25% slower to decode is the same script with a larger TOKEN_MS.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT, PREFILL_S, TOKEN_S = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000, float(sys.argv[4]) / 1000


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": "delay", "object": "model"}]})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path != "/v1/completions":
            self.reply(404, {"error": "not found"})
            return
        prompt_tokens = len(str(body.get("prompt", "")).split())
        n = max(1, int(body.get("max_tokens") or 16))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        start = time.perf_counter()
        if not body.get("stream"):
            time.sleep(PREFILL_S + (n - 1) * TOKEN_S)
            self.reply(200, {"choices": [{"text": " tok" * n, "index": 0, "finish_reason": "length"}], "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(n):
            # each token at its own deadline from the start: a late wake-up does not delay the rest
            time.sleep(max(0.0, start + PREFILL_S + i * TOKEN_S - time.perf_counter()))
            chunk = {"choices": [{"text": " tok", "index": 0, "finish_reason": "length" if i == n - 1 else None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        if (body.get("stream_options") or {}).get("include_usage"):
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
