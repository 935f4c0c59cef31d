"""Sends N greedy completions at once with the `openai` client and prints them as JSON.

Usage: openai_completions.py BASE_URL MODEL MAX_TOKENS PROMPT...   (each prompt sent once, all at once)
Prints one JSON list: [{"prompt", "text", "finish_reason", "completion_tokens"}, ...] in
prompt order, then exits 0; any API error exits 1 with the message.
"""
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai

base, model, max_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)


def one(p):
    r = client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)
    c = r.choices[0]
    return {"prompt": p, "text": c.text, "finish_reason": c.finish_reason,
            "completion_tokens": r.usage.completion_tokens}


try:
    with ThreadPoolExecutor(len(prompts)) as ex:
        out = list(ex.map(one, prompts))
except openai.APIError as e:
    print(f"API error: {e}", file=sys.stderr)
    sys.exit(1)

# A bad request must come back as a 400 in OpenAI's error shape.
try:
    client.completions.create(model=model, prompt="x", max_tokens=1, temperature=5)
    print("a temperature of 5 was accepted", file=sys.stderr)
    sys.exit(1)
except openai.BadRequestError as e:
    assert e.status_code == 400 and "temperature" in str(e), e
print(json.dumps(out))
