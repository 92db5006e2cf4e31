"""Put small, realistic bugs into a scratch copy of the code, one at a time, and check that the tests catch
each of them.

    make mutants                                  # every mutation, 2 at a time (about 10 minutes on 2 cores)
    python tests/mutants.py --only beam           # the mutations whose name contains "beam"
    python tests/mutants.py --only cider: --only scst:    # those of either
    python tests/mutants.py --list                # what each mutation does and which tests should catch it

Each mutation names a file, the exact text it replaces (which must occur there once) and the text put in
its place, and the tests that should catch it: the fast test files or tests that cover that code, not the
whole suite. The tests first run once on the unchanged copy and must pass. Then, for each mutation, the
runner restores the copy, applies the mutation and runs its tests. A test that fails catches it; a mutation
whose tests all pass survived, and the run exits non-zero. When a change to the code moves or rewrites a
mutated line, the runner says the mutation is stale, and the list below is brought up to date with it.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # a mutation whose tests run longer (a loop that never ends) counts as caught, by timeout


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    before: str
    after: str
    tests: tuple  # pytest arguments: test files, node ids, or -k expressions


ORACLE = ("tests/test_decoding_oracle.py",)
DECODING = ("tests/test_decoding_oracle.py", "tests/test_decoding.py")
PACKING = ("tests/test_packing_rules.py",)
TRAINING_RULES = ("tests/test_robustness.py", "-k", "best_checkpoint or decay or early_stop or infinite_gradient")
RESUME = ("tests/test_robustness.py", "-k", "resume_from_an_epoch_end or sigkill_mid_epoch")
METRICS = ("tests/test_metrics.py",)
LENGTH_PENALTY = ("tests/test_decoding_oracle.py", "-k", "length_penalty")
SCST_PAIRING = ("tests/test_scst.py", "-k", "own_image")
SCST_DDP = ("tests/test_scst.py", "-k", "two_processes")
CIDER = ("tests/test_cider.py",)
REFERENCES = ("tests/test_metrics.py", "-k", "every_caption_of_an_image")
CONTENT = ("tests/test_metrics.py", "-k", "grammar or content")
SCHEDULE = ("tests/test_robustness.py", "-k", "reshuffles")
PRECISE_BN = ("tests/test_precise_bn.py",)
SCST_XE = ("tests/test_scst.py", "-k", "reference_loss or xe_weight")
HARD = ("tests/test_hard_attention.py", "-k", "not hard_run and not resume")
# Read back from the figure's and the view's pixels with a one-hot decoder: no training needed.
DISK = ("tests/test_robustness.py", "-k", "disk")
SEEN = ("tests/test_what_users_see.py", "-k", "panel or view or busy or hard_model or tutorial or 51")

MUTATIONS = [
    # ---- beam search and greedy decoding
    # A beam that is not live (score -inf) and happens to end counts as a finished caption: it takes a
    # place from the live beams.
    Mutation("beam: beams that are not live can finish", "beam_search.py",
             "just_finished = (next_words == end_token) & (beam_scores > -math.inf)  # (n, K)",
             "just_finished = next_words == end_token  # (n, K)", ORACLE),
    # A finished caption keeps its place among the live beams, as the search did before it kept them apart.
    Mutation("beam: finished captions do not free their places", "beam_search.py",
             "scores = scores.masked_fill(torch.arange(k, device=scores.device) >= places, -math.inf)  # (n, K)",
             "scores = scores  # (n, K)", ORACLE),
    Mutation("beam: parent beam from the wrong divisor", "beam_search.py",
             "return scores, flat_index // vocab_size,", "return scores, flat_index // k,", ORACLE),
    Mutation("beam: the last caption to finish is returned, not the best", "beam_search.py",
             "better = top_rank > self.rank", "better = top_rank > -math.inf", ORACLE),
    Mutation("beam: the length penalty divides by the wrong length", "beam_search.py",
             "rank_score(beam_scores, t + 1, length_penalty)", "rank_score(beam_scores, 1, length_penalty)",
             LENGTH_PENALTY),
    Mutation("beam: all K beams start live (K copies of one hypothesis)", "beam_search.py",
             "beam_scores[:, 0] = 0.0", "beam_scores[:, :] = 0.0", ORACLE),
    Mutation("beam: each word's map from its own row, not its parent's", "beam_search.py",
             "alpha[rows].view(-1, k, num_pixels)", "alpha.view(-1, k, num_pixels)",
             ORACLE),
    Mutation("beam: one step fewer than max_steps", "beam_search.py",
             "    for t in range(max_steps):\n", "    for t in range(max_steps - 1):\n", DECODING),
    Mutation("greedy: the least likely word", "beam_search.py",
             "words = logits.argmax(dim=1)  # (B,)", "words = logits.argmin(dim=1)  # (B,)", ORACLE),
    # The length penalty (Wu et al. 2016) at alpha other than 0 and 1, and which length it counts.
    Mutation("beam: the length penalty multiplied by alpha, not raised to it", "beam_search.py",
             "return log_prob_sums / ((5.0 + length) / 6.0) ** length_penalty",
             "return log_prob_sums / (((5.0 + length) / 6.0) * length_penalty)", LENGTH_PENALTY),
    Mutation("beam: the length penalty counts the words without <end>", "beam_search.py",
             "rank_score(beam_scores, t + 1, length_penalty)", "rank_score(beam_scores, t, length_penalty)",
             LENGTH_PENALTY),
    Mutation("beam: the length penalty without its constant 5", "beam_search.py",
             "((5.0 + length) / 6.0) ** length_penalty", "(length / 6.0) ** length_penalty", LENGTH_PENALTY),
    # What beam search hands back with a finished caption.
    Mutation("beam: the penalised rank handed back as the caption's score", "beam_search.py",
             "self.score = torch.where(better, scores[rows, top], self.score)",
             "self.score = torch.where(better, ranks[rows, top], self.score)", ORACLE),
    Mutation("beam: a finished caption's maps taken from beam 0", "beam_search.py",
             "alpha_history[rows, top], self.alphas)", "alpha_history[rows, 0], self.alphas)", ORACLE),
    Mutation("beam: a finished beam stays live and extends", "beam_search.py",
             "beam_scores = beam_scores.masked_fill(just_finished, -math.inf)  # (n, K)",
             "beam_scores = beam_scores  # (n, K)", ORACLE),
    # ---- CIDEr-D and self-critical training
    Mutation("cider: repeated n-grams not clipped to the reference's counts", "cider.py",
             "min(weight, ref_weight) * ref_weight", "weight * ref_weight", ("tests/test_cider.py",)),
    Mutation("scst: the mean baseline includes the sample itself", "scst.py",
             "baselines = (per_image.sum(dim=1, keepdim=True) - per_image) / (num_samples - 1)  # (B, S)",
             "baselines = per_image.mean(dim=1, keepdim=True).expand_as(per_image)  # (B, S)",
             ("tests/test_scst.py", "-k", "advantages")),
    Mutation("scst: words after <end> enter the loss", "scst.py",
             "step_counted.append(~ended)  # a word after <end> is padding",
             "step_counted.append(torch.ones_like(ended))  # a word after <end> is padding",
             ("tests/test_scst.py", "-k", "sampling")),
    # Each sample rewarded against its own image's references; the gradient averaged over processes.
    Mutation("scst: samples rewarded against the references tiled, not repeated", "scst.py",
             "sampled_refs = [refs for refs in references for _ in range(args.scst_samples)]",
             "sampled_refs = references * args.scst_samples", SCST_PAIRING),
    Mutation("scst: references looked up by position in the batch, not by image", "scst.py",
             "references = [run.references[i] for i in indices.tolist()]",
             "references = [run.references[i] for i in range(len(indices))]", SCST_PAIRING),
    Mutation("scst: samples drawn from the images tiled, not repeated", "scst.py",
             "encoder_out = encoder_out.repeat_interleave(num_samples, dim=0)  # (B*S, P, E)",
             "encoder_out = encoder_out.repeat(num_samples, 1, 1)  # (B*S, P, E)", SCST_PAIRING),
    Mutation("scst: the processes' gradients summed, not averaged", "scst.py",
             "                p.grad /= run.world_size\n", "                pass\n", SCST_DDP),
    Mutation("scst: each process steps with its own gradient", "scst.py",
             "                torch_dist.all_reduce(p.grad)\n", "                pass\n", SCST_DDP),
    # --reward-against closest: the best-matched reference, for the samples' rewards and for validation.
    Mutation("cider: the closest reference taken as the first one", "cider.py",
             "10.0 * max(per_reference) / NGRAM_ORDERS", "10.0 * per_reference[0] / NGRAM_ORDERS", CIDER),
    Mutation("scst: samples rewarded against all references whatever --reward-against says", "scst.py",
             "sampled_refs, closest)", "sampled_refs)", ("tests/test_scst.py", "-k", "closest")),
    Mutation("scst: validation scored against all references whatever --reward-against says", "scst.py",
             "closest=run.reward_closest)", "closest=False)", ("tests/test_scst.py", "-k", "closest")),
    Mutation("scst: a run resumed with another --reward-against", "scst.py",
             "if saved_reward != args.reward_against:", "if False:", ("tests/test_scst.py", "-k", "another_reward")),
    # The reference cache must key on an image's whole reference set.
    Mutation("cider: reference vectors cached by an image's first reference", "cider.py",
             "key = tuple(tuple(ref) for ref in references)", "key = tuple(references[0])", CIDER),
    Mutation("cider: reference vectors cached by the set of references (repeats merged)", "cider.py",
             "key = tuple(tuple(ref) for ref in references)", "key = frozenset(tuple(ref) for ref in references)",
             CIDER),
    # ---- the model and its loss
    Mutation("penalty: sign flipped in the loss", "losses.py",
             "+ alpha_c * attention_penalty(alphas).mean()", "- alpha_c * attention_penalty(alphas).mean()",
             ("tests/test_models.py",)),
    Mutation("penalty: rewards what it should punish", "losses.py",
             "return ((1.0 - alphas.float().sum(dim=1)) ** 2).mean(dim=1)",
             "return -((1.0 - alphas.float().sum(dim=1)) ** 2).mean(dim=1)", ("tests/test_models.py",)),
    Mutation("init: h0 and c0 from one pixel, not the mean encoding", "models.py",
             "mean_encoding = encoder_out.mean(dim=1)  # (B, E)", "mean_encoding = encoder_out[:, 0]  # (B, E)",
             ("tests/test_models.py",)),
    Mutation("decoder: scores left in length-sorted order", "models.py",
             "scores[order[rows], real_steps] =", "scores[rows, real_steps] =",
             ("tests/test_models.py",)),
    # ---- hard attention and the deep output layer
    Mutation("hard: REINFORCE reinforces the cells that explain the caption worse", "losses.py",
             "reinforce_weight * (rewards - baseline) * location_log_probs",
             "reinforce_weight * (baseline - rewards) * location_log_probs", HARD),
    Mutation("hard: the entropy bonus lowers the entropy", "losses.py",
             "entropies = -(alphas * alphas.clamp(", "entropies = (alphas * alphas.clamp(", HARD),
    Mutation("hard: a caption meant to read the expectation reads a sampled cell", "models.py",
             "context = torch.where(read_expectation.unsqueeze(1), soft_context, context)",
             "context = torch.where(read_expectation.unsqueeze(1), context, soft_context)", HARD),
    Mutation("hard: decoding reads the least likely cell", "models.py",
             "location = alpha.argmax(dim=1)  # (B*K,)", "location = alpha.argmin(dim=1)  # (B*K,)", HARD),
    Mutation("deep output: eq. 7 without the previous word", "models.py",
             "hidden = torch.tanh(embeddings + self.deep_h(", "hidden = torch.tanh(self.deep_h(", HARD),
    # ---- packing and the data a model sees
    Mutation("packing: one caption short for images with fewer than required", "create_input_files.py",
             "for _ in range(cpi - len(tokens))]", "for _ in range(cpi - len(tokens) - 1)]", PACKING),
    Mutation("packing: a word seen exactly min-word-freq times becomes <unk>", "create_input_files.py",
             "if n >= min_word_freq)", "if n > min_word_freq)", PACKING),
    Mutation("packing: a caption of exactly max-len words is dropped", "create_input_files.py",
             "if len(tokens) > max_len:", "if len(tokens) >= max_len:", PACKING),
    # The planes of the packed (3, S, S) image in another order: the model would see blue as red.
    Mutation("packing: the colour planes written in BGR order", "utils.py",
             'zip(pixels, "RGB")', 'zip(pixels, "BGR")', ("tests/test_fast_jpeg.py", "-k", "other_formats")),
    # Pillow's warnings hidden per decode with warnings.catch_warnings, which is not thread-safe: the
    # decoding threads leave every warning of the process ignored. Or not hidden at all.
    Mutation("packing: Pillow's warnings hidden around each decode, in the decoding threads", "create_input_files.py",
             "        return index, load_image(path, size), None",
             '        with __import__("warnings").catch_warnings():\n'
             '            __import__("warnings").simplefilter("ignore")\n'
             "            return index, load_image(path, size), None",
             ("tests/test_fast_jpeg.py", "-k", "warning")),
    Mutation("packing: Pillow's warnings about files it decodes shown", "create_input_files.py",
             "    ignore_pillow_warnings()\n", "    pass\n", ("tests/test_fast_jpeg.py", "-k", "warning")),
    Mutation("packing: a float image's NaN and infinite values kept", "utils.py",
             "values = np.where(np.isfinite(values), values, 0.0)", "values = values",
             ("tests/test_fast_jpeg.py", "-k", "float_image")),
    Mutation("packing: the meta file's entries without the commas between them", "packed_data.py",
             'lines = ",\\n".join(', 'lines = "\\n".join(', ("tests/test_packing_rules.py", "-k", "meta_file")),
    # A disk without room: refused before packing starts, and a disk that fills anyway leaves one line
    # and no partial file.
    Mutation("packing: the free space never checked", "create_input_files.py",
             "check_free_space(out, packed_bytes(len(usable), args))", "check_free_space(out, 0)", DISK),
    Mutation("packing: the estimate leaves out the caption lengths", "create_input_files.py",
             "4 * (args.max_len + 2 + 1)", "4 * (args.max_len + 2)", DISK),
    Mutation("packing: the split files closed only after the cleanup's reach", "create_input_files.py",
             "            split_files[split].close()  # HDF5", "            pass  # HDF5", DISK),
    Mutation("packing: a full disk left as HDF5's traceback", "create_input_files.py",
             "if full is None:", "if True:", DISK),
    Mutation("converting: a full disk left as a traceback", "convert_tutorial.py",
             "if full is not None:", "if False:",
             ("tests/test_tutorial_convert.py", "-k", "disk_that_fills")),
    # A disk that fills while training saves a checkpoint: one line naming it, the one before kept whole.
    Mutation("checkpoints: a full disk while saving left as torch's traceback", "checkpoints.py",
             "if full is None:", "if True:", DISK),
    Mutation("checkpoints: a full disk said to have left nothing where the earlier checkpoint is whole",
             "checkpoints.py", "if Path(path).exists()", "if not Path(path).exists()", DISK),
    Mutation("errors: a full disk found only when it is the error raised, not what that was raised from", "utils.py",
             "exc = exc.__cause__ or exc.__context__", "exc = None", DISK),
    Mutation("errors: a full disk outside packing and checkpoints left as a traceback", "utils.py",
             "if full is None:", "if True:", DISK),
    Mutation("packing: the decoding threads default to the machine's CPU count", "create_input_files.py",
             "return len(os.sched_getaffinity(0))", "return os.cpu_count()",
             ("tests/test_fast_paths.py", "-k", "cpus_the_process")),
    Mutation("images: pixels not divided by 255 before ImageNet normalisation", "utils.py",
             "scaled = images.float() / 255.0", "scaled = images.float()", PACKING),
    Mutation("dataset: caption i paired with the wrong image", "datasets.py",
             "self._image(i // self.captions_per_image)", "self._image(i % self.captions_per_image)", PACKING),
    # ---- training
    Mutation("training: best.pt overwritten when validation did not improve", "train.py",
             'run.save("last.pt", *(["best.pt"] if improved else []))', 'run.save("last.pt", "best.pt")',
             TRAINING_RULES),
    Mutation("training: a tie counts as an improvement", "train.py",
             'improved = metrics["val_decoded_bleu4"] > progress.best_bleu4',
             'improved = metrics["val_decoded_bleu4"] >= progress.best_bleu4', TRAINING_RULES),
    Mutation("training: gradients clipped before the non-finite check", "train.py",
             "    bad_grads = False\n",
             "    torch.nn.utils.clip_grad_value_(run.trainable, args.grad_clip)\n    bad_grads = False\n",
             TRAINING_RULES),
    Mutation("training: learning rates decay even after an improvement", "train.py",
             "since > 0 and since % args.lr_decay_patience == 0", "since % args.lr_decay_patience == 0",
             TRAINING_RULES),
    Mutation("training: early stopping one epoch late", "train.py",
             "epochs_since_improvement < args.early_stop_patience:",
             "epochs_since_improvement <= args.early_stop_patience:",
             TRAINING_RULES),
    Mutation("training: gradients never zeroed between steps", "train.py",
             "        opt.zero_grad(set_to_none=True)\n", "        pass\n", RESUME),
    # ---- steps grouped by image (--captions-per-image-per-step)
    Mutation("grouped: captions start from the initial state of other images", "models.py",
             "state.repeat_interleave(per_image, dim=0)", "state.repeat(per_image, 1)", ("tests/test_grouped.py",)),
    Mutation("grouped: captions decoded in input order beside images sorted by length", "models.py",
             "first_rows = image_order.unsqueeze(1) * per_image",
             "first_rows = image_order.sort().values.unsqueeze(1) * per_image", ("tests/test_grouped.py",)),
    Mutation("grouped: a caption that ended before its image's longest keeps attention maps after its end",
             "models.py", "alphas = torch.where(real.unsqueeze(2), alphas, 0.0)", "alphas = alphas * 1",
             ("tests/test_grouped.py",)),
    Mutation("grouped: a hard caption that ended before its image's longest keeps reading cells", "models.py",
             "locations = locations.masked_fill(~real, -1)", "locations = locations", ("tests/test_grouped.py",)),
    Mutation("grouped: an item's captions paired with the image of its index", "datasets.py",
             "self._image(rows.start // self.captions_per_image)", "self._image(i // self.captions_per_image)",
             ("tests/test_grouped.py",)),
    Mutation("grouped: mid-epoch resume skips as many groups as captions were done", "train.py",
             "skip = progress.samples_done // run.world_size // train_set.captions_per_item",
             "skip = progress.samples_done // run.world_size", ("tests/test_robustness.py", "-k", "grouped_steps")),
    # ---- resume
    Mutation("resume: random state not restored", "train.py",
             '        set_rng_state(state["rng"])\n', "        pass\n", RESUME),
    Mutation("resume: optimiser state not restored", "train.py",
             '    optimizers["decoder"].load_state_dict(state["decoder_optimizer"])\n', "    pass\n", RESUME),
    Mutation("resume: mid-epoch resume starts the epoch over", "train.py",
             "skip = progress.samples_done // run.world_size", "skip = 0", RESUME),
    # ---- metrics
    Mutation("BLEU: references keep <start> and <end>", "packed_data.py",
             'special = {word_map["<start>"], word_map["<end>"], word_map["<pad>"]}',
             'special = {word_map["<pad>"]}', METRICS),
    Mutation("content: every named object counted as right", "metrics.py",
             "true_pos += len(named & present)", "true_pos += len(named)", METRICS),
    Mutation("grounding: the attention's weakest cell taken as where it looked", "metrics.py",
             "peak = int(alpha[t].argmax())", "peak = int(alpha[t].argmin())", METRICS),
    Mutation("grounding: cells that only touch a box counted as on it", "metrics.py",
             "cols = (edges[:-1] < x1) & (edges[1:] > x0)", "cols = (edges[:-1] <= x1) & (edges[1:] >= x0)", METRICS),
    Mutation("baseline: an image may be given its own captions", "eval.py",
             "donor = order[(position + 1) % len(order)]", "donor = order[position]", METRICS),
    # ---- what eval.py scores against, content accuracy, the training schedule
    Mutation("references: captions longer than --max-len left out", "create_input_files.py",
             """            record["references"].append(tokens)
            if len(tokens) > max_len:
                dropped["long_captions"] += 1
            else:
                tokenized.append(tokens)
""", """            if len(tokens) > max_len:
                dropped["long_captions"] += 1
            else:
                tokenized.append(tokens)
                record["references"].append(tokens)
""", REFERENCES),
    Mutation("references: the metadata keeps the training captions as references", "create_input_files.py",
             '"references": record["references"],', '"references": record["tokens"],', REFERENCES),
    Mutation("references: eval cuts each image's references to five", "eval.py",
             'return [m["references"] for m in meta], []', 'return [m["references"][:5] for m in meta], []',
             REFERENCES),
    Mutation("content: the colour looked for one word too far back", "metrics.py",
             "for j in (i - 1, i - 2):", "for j in (i - 2, i - 3):", CONTENT),
    Mutation("content: skipping the leading article shifts every index", "metrics.py",
             "for i, word in enumerate(words):", "for i, word in enumerate(words[1:]):", CONTENT),
    Mutation("content: naming more objects than the image has counts as exact", "metrics.py",
             "exact += named == present", "exact += named >= present", CONTENT),
    Mutation("content: as many objects named as present counts as exact", "metrics.py",
             "exact += named == present", "exact += len(named) == len(present)", CONTENT),
    Mutation("schedule: the sampler's order is the same every epoch", "train.py",
             "        sampler.set_epoch(progress.epoch)\n", "        sampler.set_epoch(0)\n", SCHEDULE),
    Mutation("schedule: each process shuffles with a seed of its own", "train.py",
             "shuffle=True,\n                                 seed=args.seed)",
             "shuffle=True,\n                                 seed=args.seed + run.rank)",
             ("tests/test_distributed.py", "-k", "two_processes_train_one_model")),
    Mutation("schedule: a run resumed mid-epoch decays its learning rates again", "train.py",
             "return progress.samples_done == 0 and since > 0", "return since > 0", SCHEDULE),
    Mutation("schedule: resume sets the decoder's learning rate back to --decoder-lr", "train.py",
             '    optimizers["decoder"].load_state_dict(state["decoder_optimizer"])\n',
             '    optimizers["decoder"].load_state_dict(state["decoder_optimizer"])\n'
             '    optimizers["decoder"].param_groups[0]["lr"] = args.decoder_lr\n', SCHEDULE),
    # ---- the scripts' error handling
    Mutation("errors: a user error becomes a traceback", "utils.py",
             'raise SystemExit(f"{prog}: error: {exc}") from None', "raise",
             ("tests/test_robustness.py", "-k", "bad_checkpoint_in_one_line and eval")),
    Mutation("errors: Ctrl-C outside training exits 1, not 130", "utils.py",
             "raise SystemExit(128 + signal.SIGINT) from None", "raise SystemExit(1) from None",
             ("tests/test_robustness.py", "-k", "ctrl_c")),
    Mutation("errors: resume accepts other architecture arguments", "train.py",
             "for name in ARCH_ARGS if arch_arg(saved, name) != getattr(args, name)]",
             "for name in ARCH_ARGS if arch_arg(saved, name) == getattr(args, name) and False]",
             ("tests/test_robustness.py", "-k", "other_architecture_arguments")),
    Mutation("errors: eval accepts a data folder of another word map", "checkpoints.py",
             "    if data_word_map != checkpoint_word_map:\n", "    if False:\n",
             ("tests/test_robustness.py", "-k", "another_word_map")),
    # ---- what users see: word i's map, where the photo has it (the figure and the page's view)
    Mutation("shown: figure: panel i shows the next word's map", "caption.py",
             "for alpha in alphas]  # word i: its own map", "for alpha in [*alphas[1:], *alphas[-1:]]]", SEEN),
    Mutation("shown: figure and view: the map transposed", "caption.py",
             "view(1, 1, grid, grid)  # (1, 1, grid, grid), row-major as P",
             "view(1, 1, grid, grid).transpose(2, 3)  # (1, 1, grid, grid)", SEEN),
    Mutation("shown: page: the view for word i shows the next word's map", "app.py",
             "return attention_panel(result.pixels, result.alphas[step],",
             "return attention_panel(result.pixels, result.alphas[min(step + 1, len(result.words) - 1)],", SEEN),
    Mutation("shown: figure and view: the photo squashed to a square", "caption.py",
             "size = tuple(max(1, round(side * scale)) for side in image.size)  # (W, H)",
             "size = (longest_side, longest_side)  # (W, H)", SEEN),
    Mutation("shown: figure and view: a hard model's cell marked with row and column swapped", "caption.py",
             "row, col = divmod(int(alpha.argmax()), grid)", "col, row = divmod(int(alpha.argmax()), grid)", SEEN),
    Mutation("shown: figure and view: the map drawn as a wash, nothing dimmed", "caption.py",
             "pixels = pixels * (DIM + (1 - DIM) * stretched_map(alpha, grid, height, width))[..., None]",
             "pixels = 0.35 * pixels + 0.65 * 255 * stretched_map(alpha, grid, height, width)[..., None]", SEEN),
    Mutation("shown: captions: one step fewer than the tutorial by default", "beam_search.py",
             "MAX_STEPS = 51", "MAX_STEPS = 50", SEEN),
    Mutation("shown: captions: one cut off at max steps passes for finished", "beam_search.py",
             "return len(tokens) >= max_steps", "return len(tokens) > max_steps", SEEN),
    # ---- what a new user trips over
    Mutation("eval: scored against the packed captions, not every reference", "eval.py",
             'if all("references" in m for m in meta):', 'if not meta:', METRICS),
    Mutation("resume: the epoch's running sums are not read back", "train.py",
             "for f in fields(Progress) if f.name in state}", 'for f in fields(Progress) if f.name in state '
             'and f.name != "epoch_sums"}', RESUME),
    Mutation("bleu: nltk's underflow written as it comes", "metrics.py",
             "(0.0 if score < 1e-50 else score)", "score", ("tests/test_new_user.py", "-k", "bleu")),
    # ---- the demo's training: BatchNorm statistics recomputed, the mixed self-critical objective
    Mutation("precise bn: statistics kept as a moving average", "train.py",
             "layer.momentum = None  # None", "layer.momentum = 0.1  # None", PRECISE_BN),
    Mutation("precise bn: batches drawn afresh each time, not by seed and epoch", "train.py",
             "generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)",
             "generator = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))", PRECISE_BN),
    Mutation("scst: reference captions flattened caption by caption, not image by image", "scst.py",
             "train.caption_rows(captions.to(features.device), lengths.to(features.device))",
             "train.caption_rows(captions.transpose(0, 1).reshape(captions.shape).to(features.device), "
             "lengths.transpose(0, 1).reshape(lengths.shape).to(features.device))", SCST_XE),
    Mutation("scst: --xe-weight read but never added", "scst.py",
             "loss = loss + args.xe_weight * reference_loss(", "loss = loss + 0 * reference_loss(", SCST_XE),
    Mutation("scst: --xe-weight fits each image's first reference at every step", "scst.py",
             "column = turn % captions.shape[1]", "column = 0", SCST_XE),
    Mutation("scst: --xe-weight's references taken in turn by the step within the epoch", "scst.py",
             "reference_in_turn(captions, lengths, run.progress.steps_trained)",
             "reference_in_turn(captions, lengths, step)", SCST_XE),
]


def copy_of_repo(destination):
    """The tracked and untracked-but-not-ignored files of the repository, copied to `destination`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(folder, tests):
    """Run pytest on `tests` in `folder`; returns (passed, names of the failing tests, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    started = time.time()
    try:
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, [f"(timed out after {TIMEOUT_S} s)"], time.time() - started
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    if result.returncode != 0 and not failed:  # collection errors and the like: name the last line
        failed = [result.stdout.strip().splitlines()[-1] if result.stdout.strip() else f"exit {result.returncode}"]
    return result.returncode == 0, failed, time.time() - started


def try_mutation(mutation, folder):
    """Apply `mutation` to the copy in `folder`, run its tests, restore the file. Returns a result dict."""
    path = folder / mutation.file
    original = path.read_text()  # the copy's, as made at the start: edits to the repository meanwhile do not leak in
    count = original.count(mutation.before)
    if count != 1:
        return {"mutation": mutation, "status": "stale", "seconds": 0.0,
                "by": f"its text occurs {count} times in {mutation.file}"}
    path.write_text(original.replace(mutation.before, mutation.after))
    try:
        passed, failed, seconds = run_tests(folder, mutation.tests)
    finally:
        path.write_text(original)
    return {"mutation": mutation, "status": "survived" if passed else "caught", "seconds": seconds,
            "by": ", ".join(failed[:2]) if failed else ""}


def run_all(mutations, jobs):
    """Every mutation, `jobs` at a time, each job in its own copy of the repository."""
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        folders = [Path(scratch) / f"copy{i}" for i in range(jobs)]
        for folder in folders:
            copy_of_repo(folder)
        targets = sorted({t for m in mutations for t in _files(m.tests)})
        passed, failed, seconds = run_tests(folders[0], targets)
        print(f"unchanged code: {'all tests pass' if passed else 'FAILING ' + ', '.join(failed)} "
              f"({len(targets)} test files, {seconds:.0f} s)", flush=True)
        if not passed:
            return None
        free = list(folders)

        def job(mutation):
            folder = free.pop()
            try:
                result = try_mutation(mutation, folder)
            finally:
                free.append(folder)
            print(f"{result['status']:9s} {result['seconds']:5.0f} s  {mutation.name}", flush=True)
            return result

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(job, mutations))


def _files(tests):
    """The test files among pytest arguments (what the unchanged run checks)."""
    return [t.split("::")[0] for t in tests if t.startswith("tests/")]


def table(results):
    """The results as a Markdown table."""
    lines = ["| mutation | file | result | caught by | seconds |", "|---|---|---|---|---:|"]
    for r in results:
        m = r["mutation"]
        lines.append(f"| {m.name} | {m.file} | {r['status']} | {r['by']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=None,
                        help="run only the mutations whose name contains this text (repeat it for several)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="mutations tried at once, each with one thread (default 2, for 2 cores)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or any(text in m.name for text in args.only)]
    if args.list:
        for m in mutations:
            print(f"{m.name}\n    {m.file}: {m.before.strip()!r} -> {m.after.strip()!r}")
            print(f"    tests: {' '.join(m.tests)}")
        return 0
    started = time.time()
    results = run_all(mutations, max(1, args.jobs))
    if results is None:
        print("the tests fail on the unchanged code: fix that first", file=sys.stderr)
        return 2
    print()
    print(table(results))
    counts = {s: sum(r["status"] == s for r in results) for s in ("caught", "survived", "stale")}
    print(f"\n{counts['caught']} caught, {counts['survived']} survived, {counts['stale']} stale, "
          f"of {len(results)} mutations in {time.time() - started:.0f} s")
    return 0 if counts["caught"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
