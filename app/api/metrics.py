"""``GET /metrics``: the Prometheus exposition, aggregated over all workers."""

from flask import Blueprint, Response

from app.metrics import render

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    body, content_type = render()
    return Response(body, content_type=content_type)
