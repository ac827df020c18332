"""What a create asked for, kept with its task so any surface can echo it back (prompt, model, size, length)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# The upstream's documented defaults (UPSTREAM.md): 1152x768, 121 frames at 24 fps.
DEFAULT_WIDTH = 1152
DEFAULT_HEIGHT = 768
DEFAULT_FRAMES = 121
DEFAULT_FRAME_RATE = 24


@dataclass(frozen=True)
class RequestMeta:
    """The parts of a create that clients see again when they poll or list: all optional."""

    prompt: str | None = None
    model: str | None = None
    size: str | None = None  # "WIDTHxHEIGHT"
    seconds: str | None = None

    def to_json(self) -> str:
        # Not `asdict`: it deep-copies every field, and this runs on every create.
        fields = {"prompt": self.prompt, "model": self.model, "size": self.size, "seconds": self.seconds}
        return json.dumps({k: v for k, v in fields.items() if v is not None}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | None) -> RequestMeta:
        """The meta recorded with a task; empty for tasks made before it was recorded, or unreadable."""
        try:
            doc = json.loads(text) if text else {}
        except ValueError:
            return cls()
        if not isinstance(doc, dict):
            return cls()
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__ and isinstance(v, str)})

    @classmethod
    def from_native(cls, doc: dict[str, Any]) -> RequestMeta:
        """From an upstream-style JSON create, with the upstream's defaults for what it leaves out."""
        width, height = _int(doc.get("width"), DEFAULT_WIDTH), _int(doc.get("height"), DEFAULT_HEIGHT)
        frames, rate = _int(doc.get("num_frames"), DEFAULT_FRAMES), _int(doc.get("frame_rate"), DEFAULT_FRAME_RATE)
        prompt, model = doc.get("prompt"), doc.get("model")
        return cls(
            prompt=prompt if isinstance(prompt, str) else None,
            model=model if isinstance(model, str) else None,
            size=f"{width}x{height}",
            seconds=str(round(max(frames - 1, 0) / rate)) if rate > 0 else None,
        )


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
