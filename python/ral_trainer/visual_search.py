"""A synthetic visual-search task for the CPU demo: find the marked square, say its color.

Each image is a ``grid x grid`` board of ``cell``-pixel cells (default 4 x 4 cells of 16 px:
64 x 64 px). ``num_objects`` cells hold a colored square; the target (12 px, with a white
marker dot) is the only big one, the distractors are small (4 px) squares whose colors may
repeat the target's, so the answer cannot be read off the color histogram exactly: the
model does best by *looking at* the marked cell. With
Qwen2.5-VL's 8-px patches and 2 x 2 spatial merge, each cell is exactly one visual token,
so the last layer's attention over the image is a ``grid x grid`` heatmap.
``VisualSearchTask.scaled(grid)`` grows the number of distractors with the board (a quarter
of the cells hold an object), for the scaling study (``ral-study``).

Prompts are token ids of a tiny word vocabulary (no tokenizer download)::

    <bos> user <vision_start> <image>*16 <vision_end> what color marked square ? think then answer assistant
    <bos> user <vision_start> <image>*16 <vision_end> what color marked square ? answer directly assistant

``style="think"`` (GRPO, RAL): the model may emit up to ``max_completion_length`` tokens;
its answer is the last color word before ``<eos>``. ``style="direct"`` (RAL-zero): the
answer is the first token. Reward: 1 for the right color, else 0.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

WORDS = ["<pad>", "<bos>", "<eos>", "<vision_start>", "<vision_end>", "<image>", "<video>", "<think>", "</think>",
         "user", "assistant", "what", "color", "marked", "square", "?", "think", "then", "answer", "directly",
         "red", "green", "blue", "yellow", "magenta", "cyan", "white_", "hmm", "look", "at", "the", "cell"]
VOCAB = {w: i for i, w in enumerate(WORDS)}
PAD, BOS, EOS, VSTART, VEND, IMAGE, VIDEO = 0, 1, 2, 3, 4, 5, 6
COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
RGB = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.95, 0.1),
       "magenta": (1.0, 0.1, 1.0), "cyan": (0.1, 0.95, 1.0)}
COLOR_IDS = [VOCAB[c] for c in COLORS]


def decode(ids) -> str:
    return " ".join(WORDS[i] for i in ids if 0 <= i < len(WORDS))


@dataclasses.dataclass
class VisualSearchTask:
    grid: int = 4
    cell: int = 16
    patch_size: int = 8
    num_objects: int = 4
    num_colors: int = 4
    target_size: int = 12  # side of the target square (px)
    distractor_size: int = 4  # side of the distractor squares (small: the marked target is the big one)
    marker: bool = True  # white dot on the target
    style: str = "think"  # "think" | "direct"
    temporal_patch_size: int = 2
    merge: int = 2

    def __post_init__(self):
        if self.style not in ("think", "direct"):
            raise ValueError(f"style must be 'think' or 'direct', got {self.style!r}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1 cells per side, got {self.grid}")
        if not 1 <= self.num_objects <= self.grid * self.grid:
            raise ValueError(f"num_objects must be in [1, grid * grid = {self.grid * self.grid}] (one object per "
                             f"cell), got {self.num_objects}")
        if not 1 <= self.num_colors <= len(COLORS):
            raise ValueError(f"num_colors must be in [1, {len(COLORS)}], got {self.num_colors}")
        if self.cell != self.patch_size * self.merge:
            raise ValueError("cell must equal patch_size * merge so that one cell is one visual token")
        self.colors = COLORS[: self.num_colors]

    @classmethod
    def scaled(cls, grid: int, *, density: float = 0.25, **kwargs) -> "VisualSearchTask":
        """The task on a ``grid x grid`` board whose object count grows with the board:
        ``max(4, round(density · grid²))`` objects, one target and the rest distractors
        (4 x 4: 4 objects, as the ``ral-train`` demo; 8 x 8: 16; 12 x 12: 36; 24 x 24: 144)."""
        if not 0 < density <= 1:
            raise ValueError(f"density (share of cells holding an object) must be in (0, 1], got {density}")
        return cls(grid=grid, num_objects=min(grid * grid, max(4, round(density * grid * grid))), **kwargs)

    # ---- sizes
    @property
    def image_size(self) -> int:
        return self.grid * self.cell

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    def prompt_ids(self) -> list[int]:
        tail = ["think", "then", "answer"] if self.style == "think" else ["answer", "directly"]
        words = ["<bos>", "user", "<vision_start>"] + ["<image>"] * self.num_image_tokens + [
            "<vision_end>", "what", "color", "marked", "square", "?"] + tail + ["assistant"]
        return [VOCAB[w] for w in words]

    @property
    def image_offset(self) -> int:
        return 3  # position of the first <image> token in the prompt

    # ---- sampling
    def sample(self, n: int, generator: torch.Generator) -> list[dict]:
        """``n`` problems: ``image [3, H, W]`` in [0, 1], the answer, the target cell."""
        out = []
        for _ in range(n):
            cells = torch.randperm(self.grid * self.grid, generator=generator)[: self.num_objects].tolist()
            cols = torch.randint(len(self.colors), (self.num_objects,), generator=generator).tolist()
            img = torch.zeros(3, self.image_size, self.image_size)
            c = self.cell
            for j, (cell_idx, ci) in enumerate(zip(cells, cols)):
                r0, c0 = (cell_idx // self.grid) * c, (cell_idx % self.grid) * c
                size = self.target_size if j == 0 else self.distractor_size
                a = (c - size) // 2
                img[:, r0 + a: r0 + a + size, c0 + a: c0 + a + size] = torch.tensor(RGB[self.colors[ci]])[:, None, None]
            if self.marker:  # the first object is the target: a white dot in its centre
                r0, c0 = (cells[0] // self.grid) * c, (cells[0] % self.grid) * c
                m = c // 2
                img[:, r0 + m - 3: r0 + m + 3, c0 + m - 3: c0 + m + 3] = 1.0
            out.append({"image": img, "answer": VOCAB[self.colors[cols[0]]], "target_cell": cells[0],
                        "input_ids": self.prompt_ids()})
        return out

    # ---- model inputs (Qwen2-VL / Qwen2.5-VL layout)
    def pixel_values(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_values [patches, 3·tp·p·p], image_grid_thw [1, 3])`` exactly as
        Qwen2-VL's image processor lays them out (normalized to [-1, 1])."""
        p, mg, tp = self.patch_size, self.merge, self.temporal_patch_size
        x = image * 2 - 1
        gh = gw = self.image_size // p
        x = x.reshape(3, gh // mg, mg, p, gw // mg, mg, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, tp, -1, -1).reshape(gh * gw, 3 * tp * p * p)
        return x.contiguous(), torch.tensor([[1, gh, gw]])

    def model_extras(self, problem: dict) -> dict:
        pv, thw = self.pixel_values(problem["image"])
        return {"pixel_values": pv, "image_grid_thw": thw}

    # ---- reward
    def answer_index(self, completion: list[int]) -> Optional[int]:
        """Index in the completion of the token that counts as the answer."""
        toks = completion
        if EOS in toks:
            toks = toks[: toks.index(EOS)]
        if self.style == "direct":
            return 0 if toks else None
        idx = [i for i, t in enumerate(toks) if t in COLOR_IDS]
        return idx[-1] if idx else None

    def correct(self, completion: list[int], problem: dict) -> bool:
        i = self.answer_index(completion)
        return i is not None and completion[i] == problem["answer"]

    def reward(self, completions: list[list[int]], problems: list[dict]) -> list[float]:
        return [1.0 if self.correct(c, p) else 0.0 for c, p in zip(completions, problems)]

    def target_positions(self, problem: dict, prompt_len: int, pad_left: int) -> list[int]:
        """Positions (in the left-padded input) of the target cell's visual token."""
        return [pad_left + self.image_offset + problem["target_cell"]]

    def image_positions(self, pad_left: int) -> list[int]:
        return list(range(pad_left + self.image_offset, pad_left + self.image_offset + self.num_image_tokens))
