"""``GET /openapi.json``: the OpenAPI document of the gateway, as kept in the repo."""

from importlib import resources

from flask import Blueprint, Response

bp = Blueprint("openapi", __name__)
DOCUMENT = "openapi.json"


def document_bytes():
    """Return the document's bytes from the package (wherever it is installed)."""
    return resources.files(__package__).joinpath(DOCUMENT).read_bytes()


@bp.get("/openapi.json")
def openapi_document():
    # Read per request: 40 KB from the page cache costs microseconds, and no
    # copy is held in the worker that could drift from the file.
    return Response(document_bytes(), mimetype="application/json")
