#!/usr/bin/env python3
"""Renders the chat templates in Tests/Fixtures/chat-templates/ with Python jinja2, configured exactly as
transformers' `apply_chat_template` configures it, and writes the expected outputs to goldens.jsonl there.

transformers (utils/chat_template_utils.py, `_compile_jinja_template` and `render_jinja_template`):
  ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])
  filters["tojson"] = json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
  globals["raise_exception"] raises TemplateError; globals["strftime_now"] = datetime.now().strftime(fmt)
  render(messages=chat, tools=<schemas or None>, documents=None, add_generation_prompt=..., **special_tokens, **kwargs)
Here `strftime_now` is pinned to 2024-07-26 12:00:00 so the goldens are reproducible (the Swift test sets
`fixedNow` to the same instant). Each golden line is one of:
  {"template": file, "case": name, "messages", "extra", "add_generation_prompt", "bos_token", "eos_token",
   "rendered": text}  or the same with "error": message and "raised": true when raise_exception fired;
  {"snippet": template source, "context": variables, "rendered" | "error"}: small language checks
  ("context": "random" means the variables of the {"random_context": ...} line).

Conversations go through transformers 5's message normalization first (None-valued keys dropped, reasoning
aliased as reasoning_content and thinking; an empty conversation is an error), and every conversation golden is
checked to equal what transformers' own `render_jinja_template` renders (the script stops otherwise).

Usage: python3 scripts/make_chat_template_goldens.py   (needs jinja2 >= 3.1 and transformers 5)
"""
import copy, datetime, json, os
import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures", "chat-templates")
FIXED_NOW = datetime.datetime(2024, 7, 26, 12, 0, 0)


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return FIXED_NOW.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


ENV = make_env()


def render(source, messages, add_generation_prompt, bos_token, eos_token, extra):
    """Mirrors ChatTemplate.render: tools and documents default to None, as in transformers."""
    kwargs = {"tools": None, "documents": None}
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if eos_token is not None:
        kwargs["eos_token"] = eos_token
    kwargs.update(extra)
    out = {}
    try:
        out["rendered"] = ENV.from_string(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.exceptions.TemplateSyntaxError as e:
        out["error"] = f"syntax: {e}"
        out["raised"] = False
    except jinja2.exceptions.TemplateError as e:
        out["error"] = str(e)
        out["raised"] = type(e) is jinja2.exceptions.TemplateError
    except Exception as e:  # TypeError etc. raised while rendering
        out["error"] = f"{type(e).__name__}: {e}"
        out["raised"] = False
    return out


def normalize_chat(messages):
    """What transformers 5's apply_chat_template does to the messages before rendering: keys whose value is None
    are dropped (`_normalize_chat_messages`), and a message's reasoning under any of its names (reasoning_content,
    thinking, reasoning; the first non-None wins) is passed as both `reasoning_content` and `thinking`
    (`_alias_reasoning_fields`; an existing `thinking` is kept)."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


EMPTY_CHAT_ERROR = "Cannot apply chat template to an empty conversation. Provide at least one message."


def render_chat(source, messages, add_generation_prompt, bos_token, eos_token, extra):
    """A conversation rendered as apply_chat_template(tokenize=False) renders it (ChatTemplate.render does the same)."""
    if not messages:
        return {"error": EMPTY_CHAT_ERROR, "raised": False}
    return render(source, normalize_chat(copy.deepcopy(messages)), add_generation_prompt, bos_token, eos_token, extra)


def transformers_render(source, messages, add_generation_prompt, bos_token, eos_token, extra):
    """The same through transformers' own code (its message normalization and `render_jinja_template`, with
    `strftime_now` pinned), to check that `render_chat` is what apply_chat_template renders."""
    from transformers.utils import chat_template_utils as ctu

    class FixedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return FIXED_NOW

    ctu.datetime = FixedDatetime
    if not messages:
        return {"error": EMPTY_CHAT_ERROR, "raised": False}
    kwargs = dict(extra)
    tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if eos_token is not None:
        kwargs["eos_token"] = eos_token
    try:
        rendered, _ = ctu.render_jinja_template(
            conversations=[ctu._normalize_chat_messages(copy.deepcopy(messages))], tools=tools, documents=documents,
            chat_template=source, add_generation_prompt=add_generation_prompt, **kwargs)
        return {"rendered": rendered[0]}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e), "raised": type(e) is jinja2.exceptions.TemplateError}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "raised": False}


TOKENS = {  # (bos, eos) each family's tokenizer passes
    "llama-2.jinja": ("<s>", "</s>"), "llama-3.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.1.jinja": ("<|begin_of_text|>", "<|eot_id|>"), "llama-3.2.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-7b-instruct-v0.1.jinja": ("<s>", "</s>"), "mistral-7b-instruct-v0.3.jinja": ("<s>", "</s>"),
    "gemma.jinja": ("<bos>", "<eos>"), "gemma-2.jinja": ("<bos>", "<eos>"), "gemma-3.jinja": ("<bos>", "<eos>"),
    "phi-3.jinja": ("<s>", "<|endoftext|>"), "phi-3.5-mini.jinja": ("<s>", "<|endoftext|>"),
    "phi-4.jinja": ("<|endoftext|>", "<|im_end|>"), "phi-4-mini.jinja": ("<|endoftext|>", "<|endoftext|>"),
    "zephyr.jinja": ("<s>", "</s>"),
    "qwen2.5.jinja": (None, "<|im_end|>"), "qwen3.jinja": (None, "<|im_end|>"),
    "smollm2.jinja": ("<|im_start|>", "<|im_end|>"),
    "mistral-small-3.1-24b-instruct-2503.jinja": ("<s>", "</s>"),
    "deepseek-r1-distill-qwen-32b.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "command-r7b-12-2024-tool_use.jinja": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    "glm-4.6.jinja": (None, "<|endoftext|>"), "kimi-k2.jinja": (None, "<|im_end|>"),
    "minimax-m2-unsloth.jinja": (None, "[e~["),
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "City name, e.g. \"Paris\""},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["location"]},
    "return": {"type": "number", "description": "Temperature"}}}
TOOL_CHAT = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call12345", "type": "function", "function": {
        "name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "22.5"},
    {"role": "assistant", "content": "It is 22.5 °C in Paris."},
]

PARALLEL_CHAT = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "reasoning_content": "Two cities, two calls.", "tool_calls": [
        {"id": "call_paris1", "type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}},
        {"id": "call_rome22", "type": "function", "function": {"name": "get_weather", "arguments": {"location": "Rome"}}}]},
    {"role": "tool", "tool_call_id": "call_paris1", "content": "18"},
    {"role": "tool", "tool_call_id": "call_rome22", "content": {"temperature": 25, "sky": "clear"}},
    {"role": "assistant", "content": "Paris 18, Rome 25."},
    {"role": "user", "content": "Thanks"},
]
STRING_ARGS_CHAT = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call12345", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"location\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "-3"},
    {"role": "assistant", "content": "<think>cold</think>It is -3."},
]

# A Qwen3-style conversation whose earlier assistant turns carry reasoning (inline <think> and the
# reasoning_content field), for the rule that re-rendering drops the reasoning of turns before the last user query.
REASONING_CHAT = [
    {"role": "user", "content": "What is 1+1?"},
    {"role": "assistant", "content": "<think>\nOne plus one.\n</think>\n\n2"},
    {"role": "user", "content": "And 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
]

CASES = [
    ("single-user", [{"role": "user", "content": "Hello!"}], {}),
    ("system-user", [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "What is 2+2?"}], {}),
    ("multi-turn", [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": "naïve café — “quotes” 😀\nsecond line"},
        {"role": "user", "content": "Tabs\tand\nnewlines\n\n"},
    ], {}),
    ("no-system-multi", [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."}], {}),
    ("bad-alternation", [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}], {}),
    ("assistant-first", [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}], {}),
    ("empty", [], {}),
    ("tools", [{"role": "system", "content": "You can call tools."}] + TOOL_CHAT, {"tools": [WEATHER_TOOL]}),
    ("tools-no-system", TOOL_CHAT, {"tools": [WEATHER_TOOL]}),
    ("tools-in-system", TOOL_CHAT[:1], {"tools": [WEATHER_TOOL], "tools_in_user_message": False}),
    ("builtin-tools", [
        {"role": "user", "content": "Search the news."},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "brave_search", "arguments": {"query": "latest news"}}}]},
        {"role": "ipython", "content": {"results": ["a", "b"]}}],
        {"builtin_tools": ["brave_search", "code_interpreter", "wolfram_alpha"], "date_string": "01 Jan 2025"}),
    ("thinking", [
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n2"},
        {"role": "user", "content": "And 2+2?"}], {"enable_thinking": False}),
    ("multimodal", [
        {"role": "system", "content": [{"type": "text", "text": "Describe images."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]}], {}),
    ("parallel-tools", PARALLEL_CHAT, {"tools": [WEATHER_TOOL]}),
    ("string-args", STRING_ARGS_CHAT, {}),
    ("documents", [{"role": "system", "content": "Use the documents."}, {"role": "user", "content": "Summarize."}],
     {"documents": [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta \"quoted\""}], "enable_citations": True}),
    ("numbers", [{"role": "user", "content": "x", "extra": [1, 2.5, True, None]}], {"date_string": "05 May 2025"}),
] + [
    # Training conversations of the Qwen3 / Gemma / Phi families: reasoning in earlier and last turns (Qwen3 drops
    # the reasoning of turns before the last user query), enable_thinking on, off and absent, conversations that end
    # on the assistant (what SFT renders), system-only and whitespace-heavy turns (Gemma trims), a Phi-4-mini system
    # message carrying its `tools` string.
    (f"{name}{suffix}", chat, dict(extra, **thinking))
    for name, chat, extra in [
        ("reasoning-earlier-turns", REASONING_CHAT, {}),
        ("reasoning-last-turn", REASONING_CHAT[:2], {}),
        ("reasoning-field-last", [{"role": "user", "content": "2+3?"},
                                  {"role": "assistant", "content": "5", "reasoning_content": "\nAdd them.\n"}], {}),
        ("reasoning-system-three-rounds", [{"role": "system", "content": "Think, then answer."}] + REASONING_CHAT
         + [{"role": "user", "content": "Last one: 9-4?"}, {"role": "assistant", "content": "<think>9-4=5</think>5"}], {}),
        ("ends-with-assistant", [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": "Bonjour"}], {}),
        ("empty-assistant", [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}], {}),
    ]
    for suffix, thinking in [("", {}), ("/thinking-on", {"enable_thinking": True}), ("/thinking-off", {"enable_thinking": False})]
] + [
    ("system-only", [{"role": "system", "content": "Only a system message."}], {}),
    ("whitespace-turns", [{"role": "system", "content": "\n sys \n"}, {"role": "user", "content": "\t  u1  \n"},
                          {"role": "assistant", "content": "  a1\n\n"}, {"role": "user", "content": " u2 "}], {}),
    ("three-rounds", [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                      {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2"},
                      {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "3"}], {}),
    ("system-after-start", [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late system."},
                            {"role": "assistant", "content": "Ok"}], {}),
    ("phi4-mini-tools", [{"role": "system", "content": "You are a helpful assistant with some tools.",
                          "tools": "[{\"name\": \"get_weather\", \"parameters\": {\"city\": {\"type\": \"str\"}}}]"},
                         {"role": "user", "content": "Weather in Oslo?"}], {}),
    ("system-tools-none", [{"role": "system", "content": "No tools.", "tools": None}, {"role": "user", "content": "Hi"}], {}),
    ("system-empty", [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], {}),
]

# Small checks of the language itself, rendered with the same defaults as the templates.
SNIPPETS = [
    ("a\n  {% if true %}\n  x\n  {% endif %}\nb", {}),
    ("  {{ 'x' }}  \n{# c #}\n  y", {}),
    ("a {%- if true -%} \n b {%+ endif %}  c", {}),
    ("{% for m in [1,2] %}\n{{ m }}\n{% endfor %}\n", {}),
    ("x\n\n", {}), ("x {# c\n #}\ny", {}), ("line1\r\nline2\r\n{% if true %}\r\nz{% endif %}", {}),
    ("{% raw %}{{ not rendered }}{% endraw %}!", {}),
    ("   {%- raw -%}  {% x %}  {%- endraw %}|", {}),
    ("{{ {'a': {'b': 1}} }}", {}),
    ("{% set x = 1 %}{% for i in [1,2,3] %}{{ x }}{% set x = x + 1 %}{{ x }};{% endfor %}{{ x }}", {}),
    ("{% for i in [1,2,3] %}{% if i == 1 %}{% set y = 5 %}{% endif %}{{ y }};{% endfor %}", {}),
    ("{% set x = 1 %}{% if true %}{% set x = 2 %}{% endif %}{{ x }}", {}),
    ("{% macro m() %}{{ z }}{% endmacro %}{% set z = 3 %}{{ m() }}", {}),
    ("{% for i in [1,2] %}{% macro m() %}{{ i }}{% endmacro %}{{ m() }}{% endfor %}", {}),
    ("{% macro f(a, b='d') %}[{{ a }}{{ b }}{{ varargs }}{{ kwargs }}]{% endmacro %}{{ f(1) }}{{ f(1, 2) }}{{ f(1, b=3) }}{{ f(1, 2, 3, c=4) }}", {}),
    ("{% macro box(t) %}<{{ caller() }}|{{ t }}>{% endmacro %}{% call box('x') %}inside{% endcall %}", {}),
    ("{{ foo.bar }}", {}), ("{{ foo['bar'] }}", {}), ("{{ {}.bar.baz }}", {}),
    ("{{ foo }}|{{ foo is defined }}|{{ foo|length }}|{{ foo|trim }}|{{ foo|default('d') }}|{% for x in foo %}x{% endfor %}", {}),
    ("{{ 3|round }} {{ 3.5|round }} {{ 2.5|round }} {{ 2.675|round(2) }} {{ 3|round(1) }} {{ -3|abs }} {{ 2.5|round(0, 'floor') }} {{ 2.1|round(1, 'ceil') }}", {}),
    ("{{ [1,'a',none,true,1.5,{'k':'v'}, ('t',), \"it's\"] }}", {}),
    ("{{ (1,2) }} {{ 1,2 }} {{ 1e5 }} {{ 1e16 }} {{ 0.1+0.2 }} {{ 7/2 }} {{ 7//2 }} {{ -7//2 }} {{ -7%3 }} {{ 2**10 }} {{ 4/2 }} {{ 2**-1 }}", {}),
    ("{{ 1e-5 }} {{ 0.0001 }} {{ 1e15 }} {{ 123456789.123 }} {{ -0.0 }} {{ 5.5 // 2 }} {{ 5.5 % 2 }} {{ -5.5 % 2 }} {{ 1.5e300 * 1e300 }}", {}),
    ("{{ 'abc'[1:] }}{{ 'abc'[-1] }}{{ [1,2,3][::-1] }}{{ [1,2,3,4,5][1:4:2] }}{{ 'héllo'[::-2] }}{{ [1,2,3][5:] }}{{ [1,2,3][-2:] }}", {}),
    ("{{ 'a' ~ 1 ~ none ~ foo ~ 1.0 ~ [1] }}", {}), ("{{ 'a' + 1 }}", {}), ("{{ foo + 1 }}", {}), ("{{ none + 1 }}", {}),
    ("{{ x is iterable }} {{ foo is iterable }} {{ 'a' is sequence }} {{ true is number }} {{ true is integer }} {{ 1.0 is float }} {{ {} is mapping }} {{ none is string }}", {"x": [1]}),
    ("{{ 'Hello World-foo bar(baz'|title }} {{ \"hello world's\".title() }} {{ 'hELLO'|capitalize }} {{ 'hELLO wORLD'.capitalize() }}", {}),
    ("{{ [3,1,2]|sort }} {{ [3,1,2]|max }} {{ ['b','A','a']|unique|list }} {{ {'b':1,'A':2}|dictsort }} {{ ['b','a','C']|sort }} {{ [3,1,2]|sort(reverse=true) }}", {}),
    ("{{ [{'n':2},{'n':1}]|sort(attribute='n') }} {{ {'b':1,'a':2}|dictsort(by='value') }} {{ ['x','Y']|min }} {{ [1,2,3]|sum }} {{ [{'v':2},{'v':3}]|sum(attribute='v') }}", {}),
    ("{{ 'a\\tb\\n' }}|{{ '\\x41\\u00e9\\101\\q\\'\\\"' }}|{{ \"it's\" }}", {}),
    ("{{ ['a\\'b', 'c\"d', 'e\\'f\"g', 'x\\ny', '\\x01', 'é', '\\u200b', '\\\\'] }}", {}),
    ("{% for a in [1,2,3] %}{{ loop.previtem }}-{{ loop.nextitem }},{% endfor %}", {}),
    ("{% for a in [1,2,3] if a > 1 %}{{ loop.index }}/{{ loop.length }}{% else %}none{% endfor %}", {}),
    ("{% for a in [] %}x{% else %}empty{% endfor %}{% for a in [1] if a > 5 %}x{% else %}filtered{% endfor %}", {}),
    ("{% for m in messages %}{{ loop.index0 }}{{ loop.index }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.cycle('a','b') }}{{ loop.depth }}{% for n in [1] %}{{ loop.depth }}{% endfor %};{% endfor %}", {"messages": [{"role": "a"}, {"role": "b"}, {"role": "c"}]}),
    ("{% for i in range(6) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}", {}),
    ("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}{% for k, v in {'c': 3}|items %}{{ k }}{{ v }}{% endfor %}{% for k in {'x': 1, 'y': 2} %}{{ k }}{% endfor %}", {}),
    ("{{ messages[1:] }}{{ messages[-1]['role'] }}{{ messages[0].role }}{{ messages|length }}", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}),
    ("{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set (c, d) = [3, 4] %}{{ c }}{{ d }}", {}),
    ("{{ 'ABC'.lower() }}{{ 'a-b-c'.replace('-', '+') }}{{ 'a-b-c'.replace('-', '+', 1) }}{{ 'abc'.startswith(('x','a')) }}{{ 'abc'.endswith('bc') }}{{ 'aXb'.title() }}{{ 'abc'.upper() }}", {}),
    ("{{ 'a b  c'.split() }}{{ 'a,b,,c'.split(',') }}{{ 'a,b,c'.split(',', 1) }}{{ 'a,b,c'.rsplit(',', 1) }}{{ ' x '.strip() }}|{{ 'xxaxx'.lstrip('x') }}|{{ 'xxaxx'.rstrip('x') }}|{{ '\\n\\nz\\n'.strip('\\n') }}", {}),
    ("{{ 'hello'.find('l') }}{{ 'hello'.rfind('l') }}{{ 'hello'.count('l') }}{{ '-'.join(['a','b']) }}{{ '12'.isdigit() }}{{ 'ab'.isalpha() }}{{ 'a\\nb\\r\\nc'.splitlines() }}", {}),
    ("{{ {'a':1}.get('b', 2) }}{{ {'a':1}.get('b') }}{{ {'a':1}.get('a') }}{{ {'a':1,'b':2}.keys()|list }}{{ {'a':1,'b':2}.values()|list }}{{ {'items': 5}['items'] }}{{ {'a':1}['keys'] is defined }}", {}),
    ("{{ [{'a':1},{'a':2}]|map(attribute='a')|list }}{{ [{'a':1},{}]|selectattr('a','defined')|list }}{{ [{'a':1},{}]|rejectattr('a')|list }}{{ [1,2,3,4]|select('odd')|list }}{{ [1,2,3,4]|reject('even')|list }}{{ [1,0,2]|select|list }}", {}),
    ("{{ [{'a':{'b':7}}]|map(attribute='a.b')|list }}{{ [{'a':1},{}]|map(attribute='a', default='z')|list }}{{ ['x','y']|map('upper')|join(',') }}{{ [' a ']|map('trim')|list }}", {}),
    ("{{ 'x'|tojson }}{{ {'a': [1, 2.0, 'é', none, true, 1e-7, 'q\"\\\\']}|tojson }}{{ {'a': [1, {}], 'b': []}|tojson(indent=2) }}", {}),
    ("{{ {'b': 1, 'a': [1, 2]}|tojson(sort_keys=true) }}{{ {'b': 1, 'a': [1, 2]}|tojson(separators=(',', ':')) }}{{ 'é😀\\u0001'|tojson(ensure_ascii=true) }}{{ [1]|tojson(indent='\\t') }}{{ {'a':1}|tojson(indent=0) }}", {}),
    ("{{ foo|tojson }}", {}),
    ("{{ range(3)|list }}{{ range(1,7,2)|list }}{{ range(5, 0, -2)|list }}", {}),
    ("{% set ns = namespace(x=1, y='a') %}{% set ns.x = ns.x + 1 %}{{ ns.x }}{{ ns }}{% for i in [1,2] %}{% set ns.y = ns.y ~ i %}{% endfor %}{{ ns.y }}", {}),
    ("{% set ns = namespace() %}{% set ns.found = false %}{% for m in [1,2,3] %}{% if m == 2 %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.found }}", {}),
    ("{% set x = 5 %}{% set x.y = 1 %}", {}),
    ("{{ 'ab'|indent(2, true) }}|{{ 'a\\nb\\n\\nc'|indent }}|{{ 'a\\nb'|indent(first=true, blank=true) }}|{{ 'a\\nb'|indent('> ') }}", {}),
    ("{{ [1,2,3]|first }}{{ []|first }}{{ 'abc'|last }}{{ 3.7|int }}{{ '42'|int }}{{ 'x'|int }}{{ '3.5'|int }}{{ '3.5'|float }}{{ ' 7 '|int }}{{ 'x'|float }}{{ true|int }}{{ '0x1A'|int(base=16) }}{{ 'zz'|int(5) }}", {}),
    ("{{ x | default('d') }}{{ none | default('d') }}{{ none | default('d', true) }}{{ '' | d('e', true) }}{{ 0 | default(1, boolean=true) }}", {"x": [1]}),
    ("{% set x %}hello {{ 1 }}{% endset %}[{{ x }}]{% set y | upper %}shout{% endset %}{{ y }}", {}),
    ("{% filter upper %}abc{{ 'def' }}{% endfilter %}{% filter replace('a', 'b')|upper %}aaa{% endfilter %}", {}),
    ("{% with a = 1, b = 2 %}{{ a + b }}{% endwith %}{{ a }}", {}),
    ("{{ true and 'x' }}{{ 0 or [] }}{{ none or 'z' }}{{ not none }}{{ 1 and 0 }}{{ '' or 0 or 'last' }}", {}),
    ("{{ -1 }}{{ - 2 ** 2 }}{{ (-2) ** 2 }}{{ 10 % 3 }}{{ +5 }}{{ 2 * 3 + 4 }}{{ 2 + 3 * 4 }}{{ (2 + 3) * 4 }}{{ 1 - 2 - 3 }}{{ 2 ** 3 ** 2 }}", {}),
    ("{{ 1 / 0 }}", {}), ("{{ 1 // 0 }}", {}),
    ("{{ [1,2] == [1,2] }}{{ 1 == 1.0 }}{{ true == 1 }}{{ 'a' < 'b' }}{{ [1,2] < [1,3] }}{{ 1 < 2 < 3 }}{{ 3 > 2 > 2 }}{{ {'a':1} == {'a':1} }}{{ none == none }}{{ foo == none }}{{ foo == bar }}", {}),
    ("{{ 1 < 'a' }}", {}), ("{{ foo < 1 }}", {}),
    ("{{ 'abc'|length }}{{ 'héllo'|length }}{{ 'héllo'|upper }}{{ 'ß'|upper }}{{ 'ÀB'|lower }}{{ {'a':1}|length }}{{ (1,2)|count }}", {}),
    ("{{ 5|string ~ 'x' }}{{ [1]|string }}{{ none|string }}{{ 'a'|safe }}{{ '<a href=\"x\">&'|e }}{{ 'one two  three'|wordcount }}", {}),
    ("{{ x.foo }}|{{ none.foo }}|{{ [1][5] }}|{{ 'a'.foo }}|{{ 5.foo }}|{{ {'a':1}.b }}|{{ x.0 }}|{{ x[0] }}|{{ 'abc'.1 }}", {"x": [1]}),
    ("{{ raise_exception('boom: ' ~ 42) }}", {}),
    ("{{ 3 is odd }}{{ 'abc' is lower }}{{ 'ABC' is upper }}{{ none is none }}{{ none is not none }}{{ 1 is number }}{{ 1.0 is integer }}{{ 6 is divisibleby 3 }}{{ 2 is even }}", {}),
    ("{{ 'a' is equalto 'a' }}{{ 1 is eq 1 }}{{ 1 is ne 2 }}{{ 2 is gt 1 }}{{ 2 is ge 2 }}{{ 1 is lt 2 }}{{ 1 is le 0 }}{{ 'a' is in 'cab' }}{{ false is sameas false }}{{ none is sameas none }}{{ true is boolean }}{{ true is true }}{{ 0 is false }}", {}),
    ("{{ x is callable }}{{ range is callable }}{{ 'upper' is filter }}{{ 'odd' is test }}{{ 'nope' is filter }}", {"x": 1}),
    ("{{ 'a' if false else 'b' if false else 'c' }}|{{ 'yes' if 1 }}|{{ ('no' if 0) is defined }}", {}),
    ("{{ 'a' 'b' }}{{ [1,2,][1] }}{{ {'a':1,}['a'] }}{{ 1_000 }}{{ 0x1F }}{{ 0o17 }}{{ 0b101 }}{{ 1.5e3 }}{{ 1E2 }}{{ (1,) }}{{ () }}", {}),
    ("{{ 'a' in 'cab' }} {{ 'k' in {'k':1} }} {{ 1 not in [1] }} {{ 'x' in foo }} {{ not 'a' in 'b' }} {{ 'a' not in 'b' }}", {}),
    ("{{ 1 in 'abc' }}", {}), ("{{ 'a' in 5 }}", {}),
    ("{{ [1,2,3]|reverse|list }}{{ 'abc'|reverse }}{{ [1,'a']|map('string')|join('-') }}{{ [1,2]|join }}{{ {'a':1}|join(',') }}{{ 'abc'|list }}{{ [{'n':'x'},{'n':'y'}]|join(', ', attribute='n') }}", {}),
    ("{{ 'ab' * 3 }} {{ [1] * 2 }} {{ [1] + [2] }} {{ 3 * 'x' }} {{ (1,) + (2,) }} {{ 'x' * 0 }}", {}),
    ("{{ strftime_now('%Y-%m-%d %H:%M:%S %A %B %j') }}", {}),
    ("{{ dict(a=1, b='x') }}{{ dict(a=1)|tojson }}", {}),
    ("{% for x in 5 %}{% endfor %}", {}),
    ("{{ 'x'.append }}", {}),
    ("{{ message['content'] | trim + '!' }}{{ message.content|length > 3 }}", {"message": {"content": " abc "}}),
    ("{{- ' a ' -}}  \n {{- 'b' }}  {{ 'c' -}}\n\n d", {}),
    ("{% if true %}\n    indented\n{% endif %}\n    {% if true %}x{% endif %}\ny", {}),
    ("{% for i in [1, 2] -%}\n  {{ i }}\n{%- endfor %}", {}),
    ("  {# comment #}  \n  text", {}), ("{#- c -#}   x", {}), ("x\n{# only #}\ny", {}),
    ("{% set loop_messages = messages %}{% for m in loop_messages %}{% set content = m.content %}{% if loop.index0 == 0 %}{% set content = 'B' + content %}{% endif %}{{ content }}{% endfor %}", {"messages": [{"content": "a"}, {"content": "b"}]}),
    ("{% set c = [1] %}{% set c = c + [2] %}{{ c }}{% set d = {'a': 1} %}{{ d.a }}{{ d['a'] }}", {}),
    ("{{ messages[0]['content'][0]['text'] }}|{{ messages[0].content[1].type }}|{{ messages[0].missing is defined }}", {"messages": [{"content": [{"text": "T"}, {"type": "image"}]}]}),
    # More corners: precedence, tests, conversions, whitespace.
    ("{{ 'a' ~ 'b' | upper }}{{ -3|abs }}{{ not 'a' in 'abc' }}{{ x is not defined }}{{ [1,2,3] | length > 2 and true }}", {}),
    ("{% macro m(a, b=a * 2) %}{{ a }}-{{ b }}{% endmacro %}{{ m(2) }}{{ m(2, 5) }}{{ m(b=1, a=3) }}", {}),
    ("{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join('\\n') }}", {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}, {"role": "user", "content": "c"}]}),
    ("{{ {'q': \"it's\", 'd': 'say \"hi\"', 'n': [none, 1.5]} }}", {}),
    ("{{ 'a' if x is defined and x else 'b' }}{{ 'abcd'[1:-1] }}{{ 10 / 4 }}{{ 2.0 * 3 }}{{ 1e100 }}{{ 0.1 * 3 }}{{ 3.0|int }}{{ -3.7|int }}{{ 1.23456|round(3) }}", {"x": 0}),
    ("{{ [1, [2, 3]]|tojson }}{{ {'a': none, 'b': {'c': []}}|tojson(indent=2) }}{{ {'é': 'ü'}|tojson }}{{ 1.0|tojson }}{{ 1e20|tojson }}{{ [true, false]|tojson }}", {}),
    ("{{ 'élan vital'|title }}{{ 'x' * -1 }}|{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}|{% for x in [1,1,2] %}{% if loop.changed(x) %}{{ x }}{% endif %}{% endfor %}", {}),
    ("{% if not messages %}none{% endif %}{{ messages[-1].content if messages else 'empty' }}", {}),
    ("{% for m in messages %}{% set content = m.content if m.content is string else m.content | map(attribute='text') | join('') %}[{{ content }}]{% endfor %}", {"messages": [{"content": "s"}, {"content": [{"text": "a"}, {"text": "b"}]}]}),
    ("{# comment with %} and {{ x }} inside #}ok{{ '}}' }}{{ '{{' }}", {}),
    ("a\n{%- set x = 'v' -%}\n\n  b{{ x }}", {}),
    ("{% if x %}1{% elif y %}2{% else %}3{% endif %}{% if y %}4{% elif x %}5{% endif %}", {"x": 0, "y": 1}),
    ("{{ x.get('a', {}).get('b') }}{{ x.get('a', {}).get('b', 'dflt') }}", {"x": {}}),
    ("{% set ns = namespace(items=[]) %}{% for i in range(3) %}{% set ns.items = ns.items + [i * i] %}{% endfor %}{{ ns.items }}", {}),
    ("{%- for m in messages %}\n  {%- if m.role == 'user' %}\n    {{- 'U:' + m.content }}\n  {%- elif m.role == 'assistant' %}\n    {{- 'A:' + m.content }}\n  {%- endif %}\n{%- endfor %}\n", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    ("{% for m in messages %}\n    {% if loop.first %}\n        first\n    {% endif %}\n    {{ m }}\n{% endfor %}", {"messages": [1, 2]}),
    ("{{ messages|length }}{{ messages[0] }}{{ messages[0].role }}", {"messages": ["just a string"]}),
    ("{{ x|items|list }}", {"x": [1, 2]}),
    ("{{ x.y.z }}", {"x": {"y": None}}),
    ("{{ x['a'] }}{{ x.a }}{{ x[0] }}{{ x['0'] }}", {"x": {"a": 1, "0": "zero"}}),
    ("{{ 'ABCDEF'|lower|replace('c', 'X')|upper }}{{ ' a '|trim|length }}{{ 'x,y'.split(',')|last }}{{ 'a b'.split()|first }}", {}),
    ("{{ nums|sum }}{{ nums|max }}{{ nums|min }}{{ nums|sort|first }}{{ nums|unique|list }}{{ (nums|sum) / (nums|length) }}", {"nums": [3, 1, 2, 3, 10]}),
    ("{{ [0.5, 1, True]|sum }}{{ 7 // 2.0 }}{{ 7 % 2.5 }}{{ -7 // 2.0 }}{{ 2 ** 0.5 }}{{ 10 ** 18 }}", {}),
    ("{{ 'a\\u00e9b'|length }}{{ '😀x'[0] }}{{ '😀x'[1:] }}{{ 'naïve'.upper() }}{{ 'İ'.lower()|length }}", {}),
    ("{% set x = 1 %}{% macro show() %}{{ x }}{% endmacro %}{% for i in [5] %}{% set x = i %}{{ show() }}{% endfor %}{{ show() }}", {}),
    ("{{ undefined_fn() }}", {}), ("{{ 'abc'.nosuchmethod() }}", {}), ("{{ [1, 2].count(1) }}{{ [3, 4].index(4) }}", {}),
    ("{{ none is defined }}{{ none|default('x') }}{{ false|default('x') }}{{ ''|default('x') }}{{ []|default('x', true) }}", {}),
    ("{% for i in range(3) %}{{ loop.revindex }}{% if loop.last %}.{% endif %}{% endfor %}{% for i in [] %}{% endfor %}", {}),
    ("{{ 1 if true else 2 }}{{ (1 if false else 2) + 1 }}{{ [1, 2] if true }}{{ 'a' ~ ('b' if false else 'c') }}", {}),
    ("{{ d|dictsort(reverse=true) }}{{ d|dictsort(true) }}{{ d.items()|list|length }}{{ d|list }}{{ d|first }}", {"d": {"b": 2, "a": 1, "C": 3}}),
    ("{{ 'Hello'|capitalize }}{{ 'hello world'|capitalize }}{{ 'HELLO'|title }}{{ \"they're bill's friends\"|title }}", {}),
    ("{{ 5 in [5.0] }}{{ true in [1] }}{{ '1' in [1] }}{{ [1] in [[1]] }}{{ 'ab' in ['ab'] }}", {}),
    ("{{ x['key with space'] }}{{ x.key }}", {"x": {"key with space": 1, "key": 2}}),
    ("{{ '%s-%d' % ('a', 3) }}{{ '%s' % 'x' }}{{ '100%%' % () }}{{ '%r' % 'q' }}{{ '%d items' % 2.9 }}{{ 'none' % [1] }}", {}),
    ("{{ '%s %s' % 'one' }}", {}), ("{{ 'x' % 1 }}", {}),
    ("{% set x = 'out' %}{% for i in [1,2] %}{% if i == 2 %}{% set x = 'in' %}{% endif %}{{ x }};{% endfor %}{{ x }}", {}),
    ("{% for i in [1,2] %}{% if i == 2 %}{% set x = 'in' %}{% endif %}{{ x }};{% endfor %}", {"x": "ctx"}),
    ("{% macro m() %}{% set x = 'm' %}{{ x }}{% endmacro %}{% set x = 'top' %}{{ m() }}{{ x }}", {}),
    ("{% for i in [1] %}{% for j in [2] %}{% set k = i + j %}{% endfor %}{{ k }}{% endfor %}", {}),
    ("{% set ns = namespace(v=0) %}{% macro inc() %}{% set ns.v = ns.v + 1 %}{% endmacro %}{{ inc() }}{{ inc() }}{{ ns.v }}", {}),
    ("{% for i in [1,2] %}{{ loop.index }}{% for j in [1] %}{{ loop.index }}{% endfor %}{% endfor %}", {}),
    ("{% for i in [1] %}{% set loop_messages = [1,2] %}{% endfor %}{{ loop_messages }}", {}),
    ("{% with x = 1 %}{% set y = 2 %}{% endwith %}{{ y }}{% set a = 1 %}{% with %}{% set a = 2 %}{{ a }}{% endwith %}{{ a }}", {}),
    ("{{ x }}{% set x = 1 %}{{ x }}{% for i in [1] %}{{ x }}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}", {"x": "ctx"}),
    ("{% set ns = namespace(f=none) %}{% set a = 'A' %}{% for i in [1, 2] %}{% macro m() %}<{{ a }}>{% endmacro %}{% set ns.f = m %}{% endfor %}{{ ns.f() }}", {}),
    ("{{ tools is none }}{{ documents is none }}{{ tools is defined }}{{ add_generation_prompt }}", {}),
]


# Random expressions over a small grammar (fixed seed): Python semantics corners the hand-written snippets miss.
RANDOM_CONTEXT = {"s": "Hello, World", "n": 7, "f": 2.5, "l": [3, 1, 2], "e": [], "d": {"k": "v", "n": 2},
                  "msgs": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                  "z": 0, "t": "  pad\tme \n", "w": "ÉtÉ ß ǅ"}
ATOMS = ["s", "n", "f", "l", "e", "d", "msgs", "z", "t", "w", "u", "none", "true", "false", "0", "1", "-3", "10",
         "0.5", "2.0", "-1.25", "1e3", "''", "'a'", "'Hello World'", "' pad '", "'x,y'", "\"it's\"", "[1, 'a']",
         "[2, 1]", "{'a': 1}", "(1, 2)", "'3'", "'4.5'"]
BINOPS = ["+", "-", "*", "/", "//", "%", "~", "==", "!=", "<", "<=", ">", ">=", "in", "not in", "and", "or"]
FILTERS = ["length", "upper", "lower", "trim", "title", "capitalize", "first", "last", "list", "sort", "reverse|list",
           "unique|list", "join(',')", "join", "string", "int", "float", "abs", "round(1)", "round", "default('D')",
           "default('D', true)", "tojson", "items|list", "dictsort", "sum", "min", "max", "replace('l', 'L')",
           "indent(2)", "count", "map(attribute='role')|list", "selectattr('role', 'equalto', 'user')|list",
           "select|list", "reject|list", "map('string')|list", "tojson(indent=1)", "wordcount", "capitalize|length"]
INDEXES = ["0", "-1", "1:", ":-1", "::-1", "'k'", "'role'", "5"]
TESTS = ["defined", "undefined", "none", "string", "number", "integer", "float", "mapping", "iterable", "sequence",
         "odd", "even", "boolean", "true", "false", "eq 1", "divisibleby 2", "lower", "upper", "in [1, 2]"]
METHODS = ["upper()", "lower()", "split(',')", "split()", "strip()", "startswith('H')", "endswith('d')",
           "replace('o', '0')", "title()", "find('o')", "count('l')", "lstrip('H')", "rstrip('d')", "items()|list",
           "get('k')", "get('zz', 5)", "keys()|list", "values()|list", "capitalize()", "isdigit()", "split(',', 1)",
           "rsplit(' ', 1)", "index(1)", "count(1)", "splitlines()"]


def random_expr(rng, depth):
    if depth <= 0 or rng.random() < 0.25:
        return rng.choice(ATOMS)
    kind = rng.randrange(7)
    a = random_expr(rng, depth - 1)
    if kind == 0:
        return f"({a} {rng.choice(BINOPS)} {random_expr(rng, depth - 1)})"
    if kind == 1:
        return f"({a}|{rng.choice(FILTERS)})"
    if kind == 2:
        return f"({a} is {rng.choice(['', 'not '])}{rng.choice(TESTS)})"
    if kind == 3:
        return f"{rng.choice(['s', 't', 'w', 'd', 'l', repr('a,b c')])}.{rng.choice(METHODS)}"
    if kind == 4:
        # Slices only on variables: jinja2's optimizer folds constant subscripts through the sandbox's getitem
        # (Undefined on failure), while runtime slices are plain Python subscripts (TypeError on failure).
        index = rng.choice(INDEXES)
        if ":" in index:
            return f"{rng.choice(['s', 'n', 'l', 'e', 'd', 'msgs', 't', 'w', 'u', 'z'])}[{index}]"
        return f"({a})[{index}]"
    if kind == 5:
        return f"(not {a})" if rng.random() < 0.5 else f"(-{a})"
    return f"({a} if {random_expr(rng, depth - 1)} else {random_expr(rng, depth - 1)})"


def random_snippets(count=1500, seed=1234):
    import random
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        expr = random_expr(rng, 3)
        if expr in seen:
            continue
        seen.add(expr)
        source = "{{ " + expr + " }}"
        # A deep copy: jinja2's `indent` does `s += "\n"`, which extends a list argument in place.
        result = render(source, [], False, None, None, copy.deepcopy(RANDOM_CONTEXT))
        text = result.get("rendered", "") + result.get("error", "")
        if " at 0x" in text or "object at" in text or "generator" in text:
            continue  # Python object reprs with addresses: not meaningful to compare
        out.append((source, RANDOM_CONTEXT))
    return out



# Random templates mixing text, whitespace and tags with every whitespace-control marker (fixed seed):
# the lexer's trim_blocks / lstrip_blocks / `-` / `+` rules, where an exact byte match is easiest to miss.
WS = ["", " ", "  ", "\n", " \n", "\n  ", "\t\n", "\n\n", "x", " a ", "b\n", "\n\t ", "  \n  "]


def random_layout(rng, depth):
    def opener():
        return rng.choice(["{%", "{%-", "{%+"])

    def closer():
        return rng.choice(["%}", "-%}", "+%}"])

    out = rng.choice(WS)
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(7 if depth > 0 else 4)
        if kind == 0:
            out += "{{" + rng.choice(["", "-"]) + " 'v' " + rng.choice(["", "-"]) + "}}"
        elif kind == 1:
            out += "{#" + rng.choice(["", "-"]) + " c " + rng.choice(["", "-", "+"]) + "#}"
        elif kind == 2:
            out += opener() + " set q = 1 " + closer()
        elif kind == 3:
            out += opener() + " raw " + rng.choice(["%}", "-%}"]) + rng.choice(WS) + "{{ r }}" + rng.choice(WS) + \
                opener() + " endraw " + closer()
        elif kind == 4:
            out += opener() + " if true " + closer() + random_layout(rng, depth - 1) + opener() + " endif " + closer()
        elif kind == 5:
            out += opener() + " for i in [1, 2] " + closer() + random_layout(rng, depth - 1) + "{{ i }}" + \
                opener() + " endfor " + closer()
        else:
            out += opener() + " if false " + closer() + random_layout(rng, depth - 1) + opener() + " else " + closer() + \
                random_layout(rng, depth - 1) + opener() + " endif " + closer()
        out += rng.choice(WS)
    return out


def random_layouts(count=400, seed=4321):
    import random
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        source = random_layout(rng, 2)
        if source not in seen:
            seen.add(source)
            out.append((source, {}))
    return out



# Random programs over `set`, `if`, `for` (with `else`, filters, `break`/`continue`), namespaces, macros and
# `with` (fixed seed): jinja2's scoping rules.
def random_program(rng, depth, in_loop=False):
    names = ["a", "b", "c"]

    def expr():
        return rng.choice(["a", "b", "c", "ns.v", "1", "'s'", "a ~ b", "(a is defined)", "loop.index if loop is defined else 0",
                           "[a, b]|length", "c|default('d')", "i if i is defined else 'noi'"])

    out = ""
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(9 if depth > 0 else 4)
        if kind == 0:
            out += "{% set " + rng.choice(names) + " = " + expr() + " %}"
        elif kind == 1:
            out += "{{ " + expr() + " }},"
        elif kind == 2:
            out += "{% set ns.v = " + expr() + " %}"
        elif kind == 3:
            out += ("{% break %}" if rng.random() < 0.5 else "{% continue %}") if in_loop and rng.random() < 0.3 else "{{ a }}|"
        elif kind == 4:
            out += "{% if " + expr() + " %}" + random_program(rng, depth - 1, in_loop) + \
                ("{% else %}" + random_program(rng, depth - 1, in_loop) if rng.random() < 0.5 else "") + "{% endif %}"
        elif kind == 5:
            cond = " if x != 2" if rng.random() < 0.3 else ""
            out += "{% for i in [1, 2, 3]" + cond + " %}" + random_program(rng, depth - 1, True) + \
                ("{% else %}E" if rng.random() < 0.3 else "") + "{% endfor %}"
        elif kind == 6:
            name = rng.choice(["m1", "m2"])
            out += "{% macro " + name + "(p='P') %}" + random_program(rng, depth - 1) + "{{ p }}{% endmacro %}{{ " + name + "() }}"
        elif kind == 7:
            out += "{% with " + rng.choice(names) + " = " + expr() + " %}" + random_program(rng, depth - 1, in_loop) + "{% endwith %}"
        else:
            out += "{% for x in [2, 3] %}{% set " + rng.choice(names) + " = x %}" + random_program(rng, depth - 1, True) + "{% endfor %}"
    return out


def random_programs(count=300, seed=2468):
    import random
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        source = "{% set ns = namespace(v=0) %}{% set a = 'A' %}" + random_program(rng, 3) + "|{{ a }}{{ b }}{{ c }}{{ ns.v }}"
        if source not in seen:
            seen.add(source)
            out.append((source, {"b": "ctxB"}))
    return out


def main():
    lines = []
    for name in sorted(os.listdir(HERE)):
        if not name.endswith(".jinja"):
            continue
        source = open(os.path.join(HERE, name), encoding="utf-8").read()
        bos, eos = TOKENS[name]
        for case, messages, extra in CASES:
            for agp in (False, True):
                entry = {"template": name, "case": case, "messages": messages, "extra": extra,
                         "add_generation_prompt": agp, "bos_token": bos, "eos_token": eos}
                entry.update(render_chat(source, messages, agp, bos, eos, extra))
                reference = transformers_render(source, messages, agp, bos, eos, extra)
                if reference.get("rendered") != entry.get("rendered") or ("error" in reference) != ("error" in entry):
                    raise SystemExit(f"{name} / {case} / agp={agp}: jinja2 as configured here and transformers differ:\n"
                                     f"{entry}\n{reference}")
                lines.append(entry)
    lines.append({"random_context": copy.deepcopy(RANDOM_CONTEXT)})
    for source, context in SNIPPETS + random_snippets() + random_layouts() + random_programs():
        # Random snippets all share RANDOM_CONTEXT, written once above.
        entry = {"snippet": source, "context": "random" if context == RANDOM_CONTEXT else copy.deepcopy(context)}
        context = copy.deepcopy(context)
        entry.update(render(source, context.get("messages", []), False, None, None,
                            {k: v for k, v in context.items() if k != "messages"}))
        lines.append(entry)
    with open(os.path.join(HERE, "goldens.jsonl"), "w", encoding="utf-8") as f:
        for entry in lines:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    errors = sum(1 for e in lines if "error" in e)
    print(f"wrote {len(lines)} goldens ({errors} expected errors) to {HERE}/goldens.jsonl")


if __name__ == "__main__":
    main()
