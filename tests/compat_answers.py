"""Answer a fixed set of requests with a published bundle, as a Hub user's environment would.

Run by tests/test_transformers_compat.py with the interpreter of another environment (transformers 4.51):
it imports nothing from this checkout, only the installed packages and the bundle folder, the way
``pipeline(model=..., trust_remote_code=True)`` and the Inference Endpoints toolkit load it::

    .venv-tf451/bin/python tests/compat_answers.py BUNDLE_DIR REQUESTS_JSON

``REQUESTS_JSON`` is a list of ``{"question": str, "image_b64": str | null, "expert": str (optional)}``.
Prints one JSON object: the environment's versions, the pipeline's records and the handler's answers, in
request order.
"""

import base64
import importlib.util
import json
import sys
from pathlib import Path


def answer_all(bundle_dir: str, requests: list[dict]) -> dict:
    import torch
    import transformers
    from transformers import pipeline

    vqa = pipeline(model=bundle_dir, trust_remote_code=True)
    pipeline_records = [
        vqa(
            {"question": r["question"], "image": base64.b64decode(r["image_b64"]) if r["image_b64"] else None},
            expert=r.get("expert"),
        )
        for r in requests
    ]
    # The toolkit's discovery: handler.py imported by file location from the repository folder, built once.
    spec = importlib.util.spec_from_file_location("handler", Path(bundle_dir) / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(bundle_dir)
    contract = [
        handler(
            {
                "inputs": {"question": r["question"], **({"image": r["image_b64"]} if r["image_b64"] else {})},
                "parameters": {"expert": r["expert"]} if r.get("expert") else {},
            }
        )
        for r in requests
    ]
    # What huggingface_hub.InferenceClient.visual_question_answering sends (image requests only).
    client_shape = [
        handler(
            {
                "inputs": r["image_b64"],
                "image": r["image_b64"],
                "question": r["question"],
                "parameters": {"expert": r["expert"]} if r.get("expert") else {},
            }
        )
        for r in requests
        if r["image_b64"]
    ]
    return {
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "pipeline": pipeline_records,
        "handler": contract,
        "handler_vqa_client": client_shape,
    }


if __name__ == "__main__":
    bundle, requests_file = sys.argv[1], sys.argv[2]
    print(json.dumps(answer_all(bundle, json.loads(Path(requests_file).read_text()))))
