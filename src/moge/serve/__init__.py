"""``moge serve``: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

* :mod:`.protocol`: request bodies (strict types, ranges) and the OpenAI error shape.
* :mod:`.text`: the checkpoint's tokenizer, chat template, streamed text deltas and stop strings.
* :mod:`.engine`: the background thread that owns the model and steps the scheduler; metrics.
* :mod:`.choices`: engine events folded into OpenAI choices (text, logprobs, finish reasons).
* :mod:`.routes`, :mod:`.app`: the FastAPI application.
* :mod:`.cli`: the ``moge serve`` command.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client). See docs/serving.md.
"""
