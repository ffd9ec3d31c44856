"""The baseline: a bare Flask + gunicorn gthread passthrough (requests to the upstream).

It forwards the request body to the upstream and the answer back, and does
nothing else: no validation, aliases, health, translation, metrics or
logging. Run by bench/run.py as ``gunicorn -w 2 --threads 16 -k gthread
bench.passthrough:app`` with UPSTREAM_URL set, so the gateway's cost can be
quoted against it in the same run.
"""

import os

import requests
from flask import Flask, Response, request

app = Flask(__name__)
UPSTREAM = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:8080/v1")
session = requests.Session()
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))


@app.post("/v1/chat/completions")
def chat():
    upstream = session.post(UPSTREAM + "/chat/completions", data=request.get_data(),
                            headers={"Content-Type": "application/json"}, timeout=(3, 120))
    return Response(upstream.content, status=upstream.status_code,
                    content_type=upstream.headers.get("Content-Type"))
