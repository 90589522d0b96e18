"""Evaluation with transformers: greedy replies, the judge, ranking accuracy; independent of the trainer's code."""

from __future__ import annotations

import statistics

import torch


class Evaluator:
    """Judges exported models against the warm-up, with transformers: independent of the trainer's code."""

    def __init__(self, world, sp_model: str, test: list, valid: list, test_pairs: list[dict], warmup_hf: str):
        from megatron_rpo.data.tokenizer import load_tokenizer

        self.world = world
        self.tok = load_tokenizer(sp_model)
        self.test, self.valid, self.test_pairs = test, valid, test_pairs
        self.warmup = self.load(warmup_hf)
        self.warmup_replies = {split: self.replies(self.warmup, prompts)
                               for split, prompts in (("test", test), ("valid", valid))}
        self.warmup_logps = self.response_logps(self.warmup)

    @staticmethod
    def load(hf_dir: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def prompt_ids(self, text: str) -> list[int]:
        return [self.tok.bos_id] + self.tok.encode(text)  # as preprocessing builds the prompt

    @torch.no_grad()
    def replies(self, model, prompts: list, max_new_tokens: int = 24) -> list[str]:
        """Greedy replies, prompts of one length batched together (no padding, so no mask subtleties)."""
        by_length: dict[int, list[int]] = {}
        ids = [self.prompt_ids(p.text) for p in prompts]
        for k, row in enumerate(ids):
            by_length.setdefault(len(row), []).append(k)
        out = [""] * len(prompts)
        for length, members in by_length.items():
            batch = torch.tensor([ids[k] for k in members])
            gen = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=self.tok.eos_id, pad_token_id=self.tok.eos_id)
            for k, row in zip(members, gen[:, length:].tolist()):
                if self.tok.eos_id in row:
                    row = row[: row.index(self.tok.eos_id)]
                out[k] = self.tok.decode(row)
        return out

    @torch.no_grad()
    def response_logps(self, model) -> torch.Tensor:
        """Summed log-probs of every test pair's [chosen, rejected] response (and eos), [pairs, 2]."""
        seqs, starts = [], []
        for row in self.test_pairs:
            prompt = self.prompt_ids(row["prompt"])
            for key in ("chosen", "rejected"):
                seqs.append(prompt + self.tok.encode(row[key]) + [self.tok.eos_id])
                starts.append(len(prompt))
        width = max(map(len, seqs))
        tokens = torch.tensor([s + [self.tok.eos_id] * (width - len(s)) for s in seqs])  # [n, s]
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for k, (s, start) in enumerate(zip(seqs, starts)):
            mask[k, start : len(s)] = True
        logits = model(tokens, attention_mask=torch.ones_like(tokens)).logits[:, :-1].float()  # right padding
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]  # [n, s-1]
        return (logp * mask[:, 1:]).sum(-1).view(-1, 2)

    def evaluate(self, hf_dir: str) -> dict:
        from megatron_rpo.evaluate.judges import ScoreJudge
        from megatron_rpo.evaluate.winrate import tally

        # The world's judge is one more judge of the project's evaluation: a win rate is computed one way.
        judge = ScoreJudge(self.world.judge, f"world {self.world.seed}")
        model = self.load(hf_dir)
        out = {}
        for split, prompts in (("test", self.test), ("valid", self.valid)):
            replies = self.replies(model, prompts)
            judgements = [judge.judge(p, r, b) for p, r, b in zip(prompts, replies, self.warmup_replies[split])]
            rewards = [j.scores[0] for j in judgements]
            out[f"{split}_reward"] = statistics.mean(rewards)
            out[f"{split}_win_rate"] = tally(j.outcome for j in judgements).win_rate
            if split == "test":
                out.update(rule_rates(self.world, prompts, replies))
                out["examples"] = [{"prompt": p.text, "reply": r, "reward": x}
                                   for p, r, x in list(zip(prompts, replies, rewards))[:: max(1, len(prompts) // 6)]]
        ratio = self.response_logps(model) - self.warmup_logps  # [pairs, 2]
        out["ranking_accuracy"] = ((ratio[:, 0] > ratio[:, 1]).float().mean()
                                   + 0.5 * (ratio[:, 0] == ratio[:, 1]).float().mean()).item()
        out["ranking_margin"] = (ratio[:, 0] - ratio[:, 1]).mean().item()  # nats, better minus worse reply
        return out


def rule_rates(world, prompts: list, replies: list[str]) -> dict:
    """How often the replies have the world's shape, and follow each of the judge's rules."""
    lead = closing = on_topic = shaped = 0
    for p, r in zip(prompts, replies):
        parts = world.parse(r)
        if parts is not None:
            want_lead, want_closing = world.groups[world.group(p)][:2]
            shaped += 1
            lead += parts[0] == want_lead
            on_topic += world.item_topic.get(parts[1]) == p.topic
            closing += parts[2] == want_closing
    n = len(prompts)
    return {"lead_rule": lead / n, "closing_rule": closing / n, "on_topic": on_topic / n, "well_formed": shaped / n}

