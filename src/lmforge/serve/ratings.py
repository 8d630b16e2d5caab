"""The human-evaluation routes of `lmforge serve --ratings FILE`: a protocol layer over RatingStore.

    GET  /v1/ratings/next?rater=ID   the rater's next item, blinded: prompt, answers "left"/"right"
                                     (or "left" alone), an opaque assignment token; progress counts
    POST /v1/ratings                 {"rater", "assignment", "scores": {"left": {criterion: 1..5}, "right": ...},
                                      "preference": "left"|"right"|"tie" (pairs), "comment"?}
    GET  /v1/ratings/summary         counts: items, pairs, ratings, raters
    POST /v1/ratings/items           add an item: {"prompt", "answer"} or {"prompt", "answer_a", "answer_b",
                                     "model_a", "model_b"} or {"prompt", "answers": [...], "models": [...]}

The page static/rate.html drives them. Errors are OpenAI's error object (APIError): 400 for a bad
request, 404 for an unknown assignment, 409 for a second rating of an item by the same rater.
Handlers are plain functions, so FastAPI runs them in its thread pool (SQLite is blocking).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from lmforge.eval.human import (
    CRITERIA,
    SCALE,
    AlreadyRated,
    RatingStore,
    UnknownAssignment,
    check_rater,
    item_fields,
)
from lmforge.serve.protocol import APIError


def _bad(err: ValueError) -> APIError:
    message = str(err)
    param = message.split(":", 1)[0] if ":" in message and " " not in message.split(":", 1)[0] else None
    return APIError(400, message, param)


def rating_routes(store: RatingStore) -> APIRouter:
    """The routes over ``store``, to include in the app (``app.include_router``)."""
    router = APIRouter(prefix="/v1/ratings")

    def progress(rater: str) -> dict:
        rated, total = store.progress(rater)
        return {"rated": rated, "total": total}

    @router.get("/next")
    def next_item(rater: str = ""):
        try:
            rater = check_rater(rater)
        except ValueError as err:
            raise _bad(err) from err
        shown = store.next_item(rater)
        blinded = shown.blinded() if shown else {"assignment": None, "kind": None, "prompt": None, "answers": {}}
        return {"object": "rating.assignment", **blinded, "criteria": list(CRITERIA), "scale": list(SCALE),
                **progress(rater)}

    @router.post("")
    def rate(body: Annotated[dict, Body()]):
        try:
            rater = check_rater(body.get("rater"))
            assignment = body.get("assignment")
            if not isinstance(assignment, str) or not assignment:
                raise ValueError("assignment: give the assignment token of GET /v1/ratings/next")
            comment = body.get("comment") or ""
            if not isinstance(comment, str):
                raise ValueError("comment: must be a string")
            rating = store.rate(assignment, body.get("scores"), body.get("preference"), comment, rater=rater)
        except UnknownAssignment as err:
            raise APIError(404, str(err), "assignment", "assignment_not_found") from err
        except AlreadyRated as err:
            raise APIError(409, str(err), "assignment", "already_rated") from err
        except ValueError as err:
            raise _bad(err) from err
        return {"object": "rating", "id": rating.id, **progress(rater)}

    @router.get("/summary")
    def summary():
        return {"object": "rating.summary", **store.summary()}

    @router.post("/items")
    def add_item(body: Annotated[dict, Body()]):
        try:
            item_id = store.add_item(**item_fields(body))
        except ValueError as err:
            raise _bad(err) from err
        return {"object": "rating.item", "id": item_id}

    return router
