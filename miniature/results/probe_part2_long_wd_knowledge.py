"""Measurement after probe_part2_long_wd.py (no rule: it adopts nothing, it sizes the next probe). With part 2 at
8,000 steps and weight decay 0.1, dev G is 89.3 / 97.0 on seeds 1 / 2, past the headroom window. What is left on G:
does the student still recall every G entry, and would sampling find the rest (pass@1 against pass@4 on dev G)?

Entry recall (`student.entry_recall`: the canonical knowledge line completed from "<name>：", greedy) for the T, G
and U diseases after pretraining, after run 6's template SFT and after this part 2; pass@k at the budget's sampler
(0.7 / 0.9, k = 4) on dev G for this part 2, as the headroom gate measures it.

    PYTHONPATH=. python miniature/results/probe_part2_long_wd_knowledge.py /work/runs/run6     # from the repo root
"""
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402

NAME = "sft_long_wd0.1"


def main(root):
    b, result = R.Budget(), {}
    for seed in (1, 2):
        work = root / f"seed_{seed}"
        stage = R.Stages(work)
        pass1, passk = R.dev_pass_at_k(work, stage, f"dev_samples_{NAME}", stage.done[NAME]["checkpoint"], b, seed)
        recall = R.entry_recalls(work, stage, ("pretrain", "sft_template", NAME))
        result[seed] = {"dev_G": stage.done[f"dev_{NAME}"]["G"], "pass@1": pass1, f"pass@{b.pass_k}": passk,
                        "entry_recall": recall}
        print(seed, json.dumps(result[seed]), flush=True)
    out = Path(__file__).with_name("probe_part2_long_wd_knowledge_seeds12.json")
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
