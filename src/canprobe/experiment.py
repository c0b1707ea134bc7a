"""A whole CAN study from one config: score, search k* per (scope, category), controls, stability, report.

Layout of the output folder (every file can be inspected with ordinary tools)::

    run.json                              the config the folder belongs to (a resume must match it)
    summary.json                          the run: config, versions, seed, timings, one row per search
    report.html                           figures and tables drawn from the files below
    activations.json                      the language model's massive activations (canprobe.massive)
    scopes/<scope>/<group>/               one search: group = a category or "pooled"
        scores.safetensors, ranking.parquet   (canprobe score)
        curve.jsonl, summary.json, run.json   (canprobe search)
        controls.json                         activation-only ranking and mean ablation at k*
        faults/<fault>/<ranking>/             robustness: one k* search per fault model and ranking
        protection.json                       robustness: collapse under random faults per protection
    scopes/<scope>/split_half/{a,b}/      rankings of two disjoint halves of the pooled images

Every stage skips what its files already hold, so rerunning a killed run resumes it. A folder made
with another config refuses to resume unless ``restart=True`` (``--restart``), which moves its old
contents to a sibling ``<out>.replaced-*`` folder; a live run holds the folder with a RunLock.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from canprobe import console, runfolder
from canprobe.ablation import RankedNeurons, fault_stats
from canprobe.checks import check_device, printable
from canprobe.config import SETTINGS, ExperimentConfig, SearchConfig
from canprobe.data import ImageSet, check_image_source, load_image_set
from canprobe.errors import InputError
from canprobe.evaluation import MaskEvaluator, default_clip_model, load_scorers
from canprobe.faults import Mean
from canprobe.identity import images_fingerprint, texts_fingerprint
from canprobe.inputs import check_context
from canprobe.massive import STUDY_IMAGES, ActivationReport, massive_activations
from canprobe.metrics import MetricSummary
from canprobe.models import LoadedModel, load
from canprobe.neurons import Search, headline_results, study_view
from canprobe.robustness import fault_kstars, protection_study, random_order
from canprobe.runfolder import (
    ACTIVATIONS_FILE,
    CONTROLS_FILE,
    SUMMARY_FILE,
    RunLock,
    atomic_write_json,
    read_json,
    stamped,
)
from canprobe.scoring import folder_ranking
from canprobe.search import find_k_star, ranked_in_scope
from canprobe.sites import SiteRegistry

log = logging.getLogger(__name__)

POOLED = "pooled"
ACTIVATION = {"method": "activation", "alpha": 0.0}  # the activation-only control's scoring


@dataclass
class Group:
    """The inputs one search runs on (one category, or all of them pooled): images, or the texts a
    text-only model continues."""

    name: str
    inputs: list
    names: list[str]
    captions: list[str] | None


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 3)


def _check_categories(config: ExperimentConfig, image_set: ImageSet) -> None:
    """Every category the study searches has at least one readable image (none is dropped unseen)."""
    wanted = check_image_source(config.data)
    readable = set(image_set.categories)
    for category in wanted:
        if category not in readable:
            bad = [printable(p) for p, _ in image_set.skipped if Path(p).parent.name == category]
            why = f" ({len(bad)} unreadable, e.g. {bad[0]})" if bad else ""
            raise InputError(
                f"category {category!r} has no readable image in {config.data.images}{why}; "
                "fix its images or leave it out with the categories field"
            )


def _check_fault_counts(config: ExperimentConfig, scope: str, neurons: int) -> None:
    """The protection study draws each fault count from the scope's neurons: a count above them cannot be drawn."""
    counts = config.faults.fault_counts
    if config.faults.protections and max(counts) > neurons:
        raise InputError(
            f"config field fault_counts: {max(counts)} random faults, but scope {scope} has "
            f"{neurons} neurons; give counts up to {neurons}"
        )


def scope_dir_name(scope: str) -> str:
    return scope.replace("/", "_")


def _groups(config: ExperimentConfig, image_set: ImageSet, texts: bool = False) -> list[Group]:
    """Per category and/or pooled; ``texts``: a text-only model continues the captions instead of seeing images."""

    def group(name: str, idx: list[int]) -> Group:
        records = [image_set.records[i] for i in idx]
        captions = [r.caption for r in records] if config.scoring.loss_text == "reference" or texts else None
        if captions is not None and any(c is None for c in captions):
            need = "a text-only model continues the texts of" if texts else "loss_text: 'reference' needs"
            raise InputError(f"{need} a caption for every image (captions.jsonl)")
        inputs = list(captions) if texts else [image_set.images[i] for i in idx]
        return Group(name, inputs, [r.name for r in records], captions)

    groups = []
    if config.study.per_category:
        for category in image_set.categories:
            groups.append(group(category, [i for i, r in enumerate(image_set.records) if r.category == category]))
    if config.study.pooled:
        groups.append(group(POOLED, list(range(len(image_set)))))
    return groups


def _jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


class Experiment:
    """Runs (or resumes) one ExperimentConfig; ``run()`` returns the run summary.

    ``restart``: start over when ``config.study.out`` holds a run of another config (its files are moved aside).
    """

    def __init__(self, config: ExperimentConfig, progress: bool = True, restart: bool = False):
        self.config = config
        self.out = Path(config.study.out)
        self.progress = progress
        self.restart = restart
        self.timings = Timings()
        self.ppl_lm: LoadedModel | None = None  # the separate PPL model, loaded once per study
        check_image_source(config.data)
        check_device(config.model.device, "config field device")
        runfolder.check_run_folder(self.out, "config field out", inputs=(config.data.images,))

    def _search_config(self, scope: str, group: str) -> SearchConfig:
        """Per-category searches run the random control only at k* and stage 1; the figures use pooled curves."""
        c = self.config
        control = "random" if "random" in c.study.controls else None
        config = c.search_config(scope, control, "curve" if group == POOLED or not c.study.pooled else "k_star")
        clip_model = c.evaluation.clip_model or default_clip_model(c.model.model)
        return dataclasses.replace(config, evaluation=dataclasses.replace(c.evaluation, clip_model=clip_model))

    def _controls(self, lm, clip, scope: str, group: Group, ranking, k_star: int | None, out: Path, search) -> dict:
        """Activation-only ranking and mean ablation, each evaluated at k*; cached in controls.json.

        They run on the pooled images (on every category when the run does not pool).
        """
        cached = read_json(out / CONTROLS_FILE)
        if isinstance(cached, dict) and cached.get("k_star") == k_star:
            return cached
        result: dict = {"k_star": k_star, "activation_collapsed": None, "mean_ablation_collapsed": None}
        wanted = [c for c in ("activation", "mean") if c in self.config.study.controls]
        if self.config.study.pooled and group.name != POOLED:
            wanted = []  # these controls answer a question about the model, asked once on all images
        if k_star is None or not wanted:
            atomic_write_json(out / CONTROLS_FILE, stamped(result))
            return result
        c = self.config
        registry = SiteRegistry.of(lm.model)
        criterion = search.criterion
        baseline = runfolder.read_summary(out).get("baseline")
        if not isinstance(baseline, dict):
            raise InputError(f"{out / SUMMARY_FILE} is not a search summary (damaged); rerun with --restart")
        baseline = MetricSummary.from_dict(baseline)
        if "activation" in wanted:
            act_ranking = self._ranking(lm, scope, group.inputs, group.captions, out / "activation", ACTIVATION)
            mask = ranked_in_scope(registry, act_ranking, scope).prefix(k_star)
            ev = self._evaluator(lm, clip, group.inputs)
            point = MetricSummary.of(ev.evaluate([mask])[0])
            result["activation"] = dataclasses.asdict(point)
            result["activation_collapsed"] = criterion.stage(point, baseline) == "collapsed"
        if "mean" in wanted:
            fault = Mean(by=c.study.mean_control)
            stats = fault_stats(lm, group.inputs, scope, [fault.spec()], c.generation)
            mask = ranked_in_scope(registry, ranking, scope).prefix(k_star)
            ev = self._evaluator(lm, clip, group.inputs, fault.spec(), stats)
            point = MetricSummary.of(ev.evaluate([mask])[0])
            result["mean_ablation"] = dataclasses.asdict(point)
            result["mean_ablation_fault"] = fault.spec()
            result["mean_ablation_collapsed"] = criterion.stage(point, baseline) == "collapsed"
        atomic_write_json(out / CONTROLS_FILE, stamped(result))
        return result

    def _ranking(self, lm, scope: str, images, captions, out: Path, method: dict | None = None) -> pd.DataFrame:
        """The ranking in ``out`` under the study's scoring, or with ``method`` (method, alpha) in its place."""
        c = self.config
        scoring = dataclasses.replace(c.scoring, **(method or {}))
        return folder_ranking(lm, images, out, scope, scoring, c.generation, c.model, captions)

    def _evaluator(self, lm, clip, inputs, fault: str | None = None, stats=None) -> MaskEvaluator:
        """An evaluator with the study's settings, and ``fault`` (with its ``stats``) in place of its own."""
        c = self.config
        evaluation = c.evaluation if fault is None else dataclasses.replace(c.evaluation, fault=fault)
        return MaskEvaluator(lm, inputs, clip, c.generation, evaluation, ppl_lm=self.ppl_lm, stats=stats)

    def _robustness(self, lm, clip, scope: str, group: Group, ranking, k_star, out: Path, search) -> dict:
        """k* per fault and ranking, and collapse under random faults per protection (``canprobe.robustness``)."""
        c = self.config
        registry = SiteRegistry.of(lm.model)
        everything = RankedNeurons.from_sites(registry.select(scope))
        top = ranked_in_scope(registry, ranking, scope)
        specs = [*c.faults.faults, c.faults.random_fault]
        stats = fault_stats(lm, group.inputs, scope, specs, c.generation, calibrate=True)  # range restriction
        rankings = {
            "can": ranking,
            "activation": self._ranking(lm, scope, group.inputs, group.captions, out / "activation", ACTIVATION),
            "random": random_order(everything, c.scoring.seed),
        }
        rows = fault_kstars(
            lm,
            group.inputs,
            clip,
            rankings,
            c.faults.faults,
            search,
            out,
            image_names=group.names,
            ppl_lm=self.ppl_lm,
            stats=stats,
        )
        protection = None
        if c.faults.protections:
            under = next(
                (r for r in rows if r["fault"] == c.faults.random_fault and r["ranking"] == "can" and r["k_star"]), None
            )
            if under is not None:
                k_protect, source = under["k_star"], f"k* of the CAN ranking under {c.faults.random_fault}"
            elif k_star is not None:
                k_protect, source = k_star, f"k* of the CAN ranking under {c.evaluation.fault}"
            else:
                k_protect, source = max(c.faults.fault_counts), "no k* found: the largest fault count"
            evaluator = self._evaluator(lm, clip, group.inputs, c.faults.random_fault, stats)
            protection = protection_study(evaluator, everything, top, k_protect, c.faults, search, stats, out)
            protection["k_protect_from"] = source
        return {
            "scope": scope,
            "category": group.name,
            "path": out.relative_to(self.out).as_posix(),
            "faults": rows,
            "protection": protection,
        }

    def _split_half(self, lm, scope: str, pooled: Group, k: int) -> dict:
        """Score two disjoint halves (even / odd images) and compare their top-k sets and score orders."""
        halves = []
        for name, idx in (("a", range(0, len(pooled.inputs), 2)), ("b", range(1, len(pooled.inputs), 2))):
            images = [pooled.inputs[i] for i in idx]
            captions = None if pooled.captions is None else [pooled.captions[i] for i in idx]
            out = self.out / "scopes" / scope_dir_name(scope) / "split_half" / name
            halves.append(self._ranking(lm, scope, images, captions, out))
        a, b = (h.set_index("address")["score"] for h in halves)
        top_a = halves[0].head(k)["address"].tolist()
        top_b = halves[1].head(k)["address"].tolist()
        # Spearman = Pearson correlation of the ranks (pandas' own spearman needs scipy)
        spearman = float(a.rank().corr(b.loc[a.index].rank()))
        return {"k": k, "jaccard": _jaccard(top_a, top_b), "spearman": spearman}

    def _activations(self, lm: LoadedModel, images: list) -> ActivationReport:
        """Massive activations of the language model on the study's first images; cached in activations.json."""
        cached = read_json(self.out / ACTIVATIONS_FILE)
        if isinstance(cached, dict):
            try:
                return ActivationReport.from_dict(cached)
            except (KeyError, TypeError):
                log.warning("%s: damaged, measured again", self.out / ACTIVATIONS_FILE)
        report = massive_activations(lm, images, generation=self.config.generation)
        atomic_write_json(self.out / ACTIVATIONS_FILE, stamped(report.to_dict()))
        return report

    def _neurons(self, lm: LoadedModel, image_set: ImageSet, results: list[dict], rankings: dict, texts) -> None:
        """Where each scope's critical neurons fire (``canprobe.neurons``): neurons.parquet and neurons.json."""
        c = self.config
        searches = [
            Search(r["scope"], rankings[(r["scope"], r["category"])], r["k_star"], r["n_neurons"])
            for r in headline_results(results)
        ]
        view = study_view(lm, image_set, searches, texts=texts, generation=c.generation)
        if view is not None:
            view.save(self.out)

    def _identity(self, image_set: ImageSet, lm: LoadedModel, clip: LoadedModel | None) -> dict:
        """What decides the folder's results (``canprobe.identity``): the config without the locations of
        the output and the images, plus the weights and the images' content, names, categories and captions."""
        records = [f"{r.name}\t{r.category}\t{r.caption}" for r in image_set.records]
        return {
            "config": self.config.to_dict(),  # canprobe.identity leaves out what SETTINGS marks as no identity
            "weights": lm.fingerprint,
            "clip_weights": clip.fingerprint if clip is not None else None,  # None: a text-only model
            "images": images_fingerprint(image_set.images),
            "records": texts_fingerprint(records),
        }

    def plan(self) -> list[str]:
        """What ``run`` would do and the memory it needs, from the model config alone (``--dry-run``)."""
        from canprobe.plan import make_plan

        c = self.config
        image_set = load_image_set(
            c.data.images,
            categories=c.data.categories,
            limit=c.data.images_per_category,
            annotations=c.data.annotations,
        )
        _check_categories(c, image_set)
        groups = _groups(c, image_set)
        lines = [f"{len(groups)} image group(s): " + ", ".join(f"{g.name} ({len(g.inputs)})" for g in groups)]
        for scope in c.study.scopes:
            largest = max(len(g.inputs) for g in groups)
            plan = make_plan(c.model, largest, scope, c.generation, searches=len(groups), growth=c.search.growth)
            _check_fault_counts(c, scope, plan.neurons)
            lines += [f"== scope {scope} (largest group)", *plan.lines]
        return lines

    def run(self) -> dict:
        """Validate everything, then run or resume the study while holding the output folder (RunLock).

        Nothing is written before the images, models, scopes and prompt have passed their checks, so
        a study that fails validation does not claim its folder.
        """
        with RunLock(self.out):  # a folder in use is refused before the models load
            image_set, groups, lm, clip = self._prepare()
            identity = self._identity(image_set, lm, clip)
            results = (SUMMARY_FILE, "scopes")
            runfolder.claim(self.out, identity, results, restart=self.restart, settings=SETTINGS)
            return self._run(image_set, groups, lm, clip)

    def _prepare(self) -> tuple[ImageSet, list[Group], LoadedModel, LoadedModel]:
        c = self.config
        start = time.perf_counter()
        image_set = load_image_set(
            c.data.images,
            categories=c.data.categories,
            limit=c.data.images_per_category,
            annotations=c.data.annotations,
        )
        for line in console.skipped(image_set):  # what the other commands print
            log.warning("%s", line)
        _check_categories(c, image_set)
        groups = _groups(c, image_set)
        self.timings.add("load images", start)
        start = time.perf_counter()
        lm = load(c.model)
        if not lm.family.takes_images:
            groups = _groups(c, image_set, texts=True)
        clip, self.ppl_lm = load_scorers(lm, c.model, c.evaluation)
        self.timings.add("load models", start)
        registry = SiteRegistry.of(lm.model)
        for scope in c.study.scopes:  # fail on a bad scope before any work
            _check_fault_counts(c, scope, sum(site.size for site in registry.select(scope)))
        check_context(lm, groups[0].inputs[0], c.generation.prompt, c.generation.max_new_tokens)
        return image_set, groups, lm, clip

    def _run(self, image_set: ImageSet, groups: list[Group], lm: LoadedModel, clip: LoadedModel) -> dict:
        c = self.config
        results, overlap, split_half, robustness = [], {}, {}, []
        tasks = [(scope, g) for scope in c.study.scopes for g in groups]
        bar = tqdm(tasks, desc="searches", disable=not self.progress, unit="search")
        rankings: dict[tuple[str, str], pd.DataFrame] = {}
        for scope, group in bar:
            bar.set_postfix_str(f"{scope} / {group.name}")
            out = self.out / "scopes" / scope_dir_name(scope) / group.name
            t = time.perf_counter()
            ranking = self._ranking(lm, scope, group.inputs, group.captions, out)
            rankings[(scope, group.name)] = ranking
            self.timings.add("scoring", t)
            t = time.perf_counter()
            search_config = self._search_config(scope, group.name)
            found = find_k_star(lm, group.inputs, ranking, clip, search_config, out, group.names, ppl_lm=self.ppl_lm)
            self.timings.add("search", t)
            t = time.perf_counter()
            controls = self._controls(lm, clip, scope, group, ranking, found.k_star, out, search_config)
            self.timings.add("controls", t)
            if (c.faults.faults or c.faults.protections) and (group.name == POOLED or not c.study.pooled):
                t = time.perf_counter()
                robustness.append(self._robustness(lm, clip, scope, group, ranking, found.k_star, out, search_config))
                self.timings.add("robustness", t)
            random = found.summary.get("random") or {}
            at_k = random.get("at_k_star")
            results.append(
                {
                    "scope": scope,
                    "category": group.name,
                    "path": out.relative_to(self.out).as_posix(),
                    "n_images": len(group.inputs),
                    "k_star": found.k_star,
                    "stage1_k": found.stage1_k,
                    "n_neurons": found.summary["scope_size"],
                    "fraction": None if found.k_star is None else found.k_star / found.summary["scope_size"],
                    "baseline": found.summary["baseline"],
                    "random_collapsed": None if at_k is None else at_k["stage"] == "collapsed",
                    "activation_collapsed": controls["activation_collapsed"],
                    "mean_ablation_collapsed": controls["mean_ablation_collapsed"],
                    "evaluations": found.summary["evaluations"]["total"],
                }
            )
        t = time.perf_counter()
        for scope in c.study.scopes:
            by_group = {r["category"]: r for r in results if r["scope"] == scope}
            k = next((r["k_star"] for r in (by_group.get(POOLED),) if r and r["k_star"]), None)
            k = k or max([r["k_star"] or 0 for r in by_group.values()] + [10])
            cats = [g.name for g in groups if g.name != POOLED]
            if len(cats) > 1:
                tops = {cat: rankings[(scope, cat)].head(k)["address"].tolist() for cat in cats}
                overlap[scope] = {
                    "k": k,
                    "categories": cats,
                    "jaccard": [[_jaccard(tops[a], tops[b]) for b in cats] for a in cats],
                }
            pooled = next((g for g in groups if g.name == POOLED), None)
            if c.study.split_half and pooled is not None and len(pooled.inputs) >= 2:
                split_half[scope] = self._split_half(lm, scope, pooled, k)
        self.timings.add("stability", t)
        t = time.perf_counter()
        # a text-only model reads its texts (the captions its groups continue)
        texts = [r.caption for r in image_set.records] if not lm.family.takes_images else None
        activations = self._activations(lm, (texts or image_set.images)[:STUDY_IMAGES])
        self.timings.add("activations", t)
        t = time.perf_counter()
        self._neurons(lm, image_set, results, rankings, texts)
        self.timings.add("neurons", t)
        peak = activations.peak
        summary = {
            "model": c.model.model,
            "config": c.to_dict(),
            "versions": runfolder.versions(),
            "seed": c.scoring.seed,
            "n_images": len(image_set),
            "skipped_images": [str(p) for p, _ in image_set.skipped],
            "results": results,
            "overlap": overlap,
            "split_half": split_half,
            "activations": {
                "images": activations.n_images,
                "massive": len(activations.massive),
                "peak": None if peak is None else dataclasses.asdict(peak),
            },
            "robustness": robustness,
            "timings": self.timings.seconds,
        }
        atomic_write_json(self.out / SUMMARY_FILE, stamped(summary))
        from canprobe.report import build_report

        build_report([self.out])
        return summary


def run_experiment(config: ExperimentConfig, progress: bool = True, restart: bool = False) -> dict:
    return Experiment(config, progress, restart).run()
