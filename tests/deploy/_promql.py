"""Which metrics and labels a PromQL expression (as written in our dashboard) refers to.

A small tokenizer, not a PromQL parser: it knows vector selectors `name{label op "value"}`, range
brackets, function and aggregation calls, `by`/`without`/`on`/`ignoring` label lists and binary
keywords, which is everything docker/grafana and docker/prometheus use. Anything it does not
understand raises, so a new construct fails loudly instead of hiding a metric name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

_TOKEN = re.compile(
    r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){}\[\],])'
    r"|(?P<number>\d+(?:\.\d+)?(?:ms|[smhdwy])?)|(?P<ident>[A-Za-z_:][\w:]*))"
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
# Labels Prometheus attaches to every scraped series (they are not in /metrics).
TARGET_LABELS = {"instance", "job"}
# Series Prometheus synthesizes per target.
SYNTHETIC_METRICS = {"up"}


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


@dataclass
class References:
    selectors: list[Selector] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"cannot tokenize {expr[pos:]!r} in {expr!r}")
        kind = match.lastgroup
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def references(expr: str) -> References:
    """Metric selectors and grouping labels of `expr`; Grafana's `$__...` intervals become `5m`."""
    expr = re.sub(r"\$__\w+", "5m", expr)
    tokens, refs, i = _tokens(expr), References(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "ident" and text in _GROUPING and following == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "ident":
                    refs.grouping_labels.add(tokens[i][1])
                i += 1
        elif kind == "ident" and text in _KEYWORDS:
            pass
        elif kind == "ident" and (following == "(" or following in _GROUPING):
            pass  # a function, or an aggregation operator (`sum by (le) (...)`)
        elif kind == "ident":
            selector = Selector(text)
            if following == "{":
                i += 2
                while tokens[i][1] != "}":
                    if tokens[i][1] == ",":
                        i += 1
                        continue
                    (_, label), (_, op), (value_kind, value) = tokens[i: i + 3]
                    if value_kind != "string":
                        raise ValueError(f"label matcher without a quoted value in {expr!r}")
                    selector.matchers.append((label, op, value[1:-1]))
                    i += 3
            refs.selectors.append(selector)
        elif text == "{":
            raise ValueError(f"selector without a metric name in {expr!r}")
        elif text == "[":
            while tokens[i][1] != "]":
                i += 1
        i += 1
    return refs


@dataclass
class Exposition:
    """Sample names of a /metrics page, with the label names and values seen on each."""

    labels: dict[str, dict[str, set[str]]]

    @classmethod
    def parse(cls, text: str) -> Exposition:
        labels: dict[str, dict[str, set[str]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                seen = labels.setdefault(sample.name, {})
                for key, value in sample.labels.items():
                    seen.setdefault(key, set()).add(value)
        return cls(labels)

    def problems(self, expr: str, scrape_jobs: set[str]) -> list[str]:
        """Every metric, matcher label and literal label value of `expr` this page does not have."""
        found, refs = [], references(expr)
        known_labels = set(TARGET_LABELS)
        for selector in refs.selectors:
            if selector.metric in SYNTHETIC_METRICS:
                label_values = {"job": scrape_jobs, "instance": set()}
            elif selector.metric in self.labels:
                label_values = {**{k: set() for k in TARGET_LABELS}, **self.labels[selector.metric]}
            else:
                found.append(f"metric {selector.metric!r} is not exposed")
                continue
            known_labels |= set(label_values)
            for label, op, value in selector.matchers:
                if label not in label_values:
                    found.append(f"{selector.metric} has no label {label!r}")
                elif "$" in value or label in TARGET_LABELS - {"job"}:
                    continue  # a dashboard variable, or a value only Prometheus knows
                elif op in ("=", "!="):
                    if value not in label_values[label]:
                        found.append(f"{selector.metric}{{{label}}} never has the value {value!r}")
                elif re.fullmatch(r"[\w:]+(\|[\w:]+)*", value):  # a plain alternation: check each word
                    found += [f"{selector.metric}{{{label}}} never has the value {word!r}"
                              for word in value.split("|") if word not in label_values[label]]
        found += [f"grouping label {label!r} is on none of {[s.metric for s in refs.selectors]}"
                  for label in sorted(refs.grouping_labels - known_labels)]
        return found


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets and query variables.

    A `label_values(selector, label)` variable query becomes the selector (and the label must be
    on it), written as `count by (label) (selector)`.
    """
    exprs = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))  # collapsed rows nest their panels
        exprs += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        if match is None:
            raise ValueError(f"unsupported variable query {query!r}")
        exprs.append(f"count by ({match.group(2)}) ({match.group(1)})")
    return exprs
