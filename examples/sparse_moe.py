"""SparseAdamW on a small Mixtral: idle experts take no ghost updates (README example).

    python examples/sparse_moe.py
"""
import torch
from transformers import MixtralConfig, MixtralForCausalLM

torch.manual_seed(0)
model = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                         num_experts_per_tok=1, max_position_embeddings=64))
ids = torch.randint(0, 128, (8, 1, 6), generator=torch.Generator().manual_seed(1))  # 8 steps of 1 x 6 tokens

# [readme:start]
from zeroadamw import SparseAdamW, moe_param_groups

groups, names = moe_param_groups(model, weight_decay=0.1)   # Mixtral / Qwen2-MoE / Qwen3-MoE style, any model
opt = SparseAdamW(groups, lr=1e-3, catchup_decay=True)      # or by hand:
experts = [p for n, p in model.named_parameters() if ".experts." in n]   # [E, out, in]: dim 0 = the experts
emb = model.get_input_embeddings()
dense_params = [p for p in model.parameters() if all(p is not q for q in experts + [emb.weight])]
by_hand = SparseAdamW([
    {"params": dense_params},                                                # plain sharded AdamW
    {"params": experts, "sparse": "rows", "process_group": None},            # dim 0 = experts; None: the world,
                                                                             # or the expert-data-parallel group
    {"params": [emb.weight], "sparse": "rows", "weight_decay": 0.0},         # embedding rows; COO grads too
], lr=1e-3, weight_decay=0.1)
# [readme:end]
del by_hand  # the example trains with `opt`
expert = model.model.layers[0].mlp.experts.gate_up_proj  # layer 0's 8 experts, [8, 96, 32]
idle, idle_drift = 0, 0.0
for x in ids:
    w = expert.detach().clone()
    steps_before = opt.state[expert]["step"].clone() if "step" in opt.state[expert] else torch.zeros(8)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    was_idle = opt.state[expert]["step"] == steps_before  # per expert: its own step count did not move
    idle += int(was_idle.sum())
    idle_drift += float((expert.detach() - w)[was_idle].norm())
print("layer 0 experts, steps taken:", [int(s) for s in opt.state[expert]["step"].tolist()], "of", len(ids))
print(f"idle (expert, step) pairs: {idle}; how far their weights moved in those steps: {idle_drift}")
