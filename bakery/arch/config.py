"""Reading a model config, object or ``config.json`` dict alike, and a multimodal wrapper's text
tower inside it."""

from __future__ import annotations

from typing import Any, Mapping


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """Read a key from a config object or a config.json dict alike."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)



def text_config_of(config: Any) -> Any:
    """The language model's config: ``text_config`` of a multimodal wrapper, else the config."""
    text = cfg_get(config, "text_config")
    return config if text is None else text


def set_text_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` where the language model reads it (``text_config`` of a wrapper, too)."""
    if isinstance(config.get("text_config"), dict):
        config["text_config"][key] = value
        if key != "tie_word_embeddings":
            return
    config[key] = value


def num_layers_of(config: Any) -> int:
    config = text_config_of(config)
    return int(cfg_get(config, "num_hidden_layers") or cfg_get(config, "n_layer"))


def hidden_size_of(config: Any) -> int:
    config = text_config_of(config)
    return int(cfg_get(config, "hidden_size") or cfg_get(config, "n_embd"))


def tied_embeddings(config: Any) -> bool:
    """Whether the output head shares the input embedding (a wrapper's own key first)."""
    value = cfg_get(config, "tie_word_embeddings")
    if value is None:
        value = cfg_get(text_config_of(config), "tie_word_embeddings", True)
    return bool(value)
