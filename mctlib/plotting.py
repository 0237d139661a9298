"""Figures for the chapters. Each function takes computed results and returns a matplotlib Figure;
none of them computes anything the library does not already provide."""

from __future__ import annotations

import statistics

import matplotlib.pyplot as plt
import torch


def new_figure(ncols: int = 1, width: float = 4.2, height: float = 3.2, **kwargs):
    """A figure with `ncols` axes in the book's style."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), constrained_layout=True, **kwargs)
    return fig, axes


# --- chapter 1: the objective transformation ---------------------------------------------------

def update_vector_noise(consecutive: torch.Tensor, step_starts: torch.Tensor, step_straightness: torch.Tensor,
                        epoch_starts: torch.Tensor, epoch_straightness: torch.Tensor, cross: torch.Tensor,
                        window_epochs: int):
    """Three views of the expert targets V_T: (a) cos between consecutive epochs' steps, one line per
    expert; (b) ||V_T|| / path length over M-epoch windows of replayed SGD runs (one row each), measured
    on every minibatch iterate and on their epoch checkpoints only (x: the window's start, in epochs);
    (c) mean cos of V_T across experts."""
    fig, axes = new_figure(3, width=3.6)
    for i, row in enumerate(consecutive):
        axes[0].plot(range(1, len(row) + 1), row.numpy(), marker=".", alpha=0.8, label=f"expert {i}")
    axes[0].set(xlabel="epoch e", ylabel=r"cos($\theta_{e}-\theta_{e-1}$, $\theta_{e+1}-\theta_e$)",
                title="(a) consecutive epoch steps", ylim=(-1, 1))
    axes[0].axhline(0, color="grey", lw=0.6)
    # one row per replayed run (a single run may be passed as a 1-D tensor)
    for r, row in enumerate(torch.atleast_2d(step_straightness)):
        axes[1].plot(step_starts.numpy(), row.numpy(), ".-", color="C3", alpha=0.7,
                     label="every minibatch step" if r == 0 else None)
    for r, row in enumerate(torch.atleast_2d(epoch_straightness)):
        axes[1].plot(epoch_starts.numpy(), row.numpy(), "s", color="k", mfc="none",
                     label="epoch checkpoints only" if r == 0 else None)
    axes[1].set(xlabel="window start (epoch)", ylabel=r"$\|V_T\|$ / path length", ylim=(0, 1.05),
                title=f"(b) straightness of M = {window_epochs} windows")
    axes[1].legend(fontsize=6)
    axes[2].plot(range(len(cross)), cross.numpy(), marker="o", color="k")
    axes[2].axhline(0, color="grey", lw=0.6)
    axes[2].set(xlabel="start epoch s", ylabel=r"mean cos($V_T^{(i)}$, $V_T^{(j)}$)", ylim=(-1, 1),
                title="(c) across experts")
    axes[0].legend(fontsize=6)
    return fig


def waypoint_loss_and_target_norm(losses: torch.Tensor, starts, target_norms: torch.Tensor,
                                  student_norms: torch.Tensor | None = None):
    """(a) The matching loss of one synthetic set at each (expert, start) waypoint: its 'training
    loss'; (b) the length of each expert's target ||V_T(s)|| (one line per expert) and, if given,
    of the student's update ||V_S|| at the same waypoints (mean over experts, dashed)."""
    fig, axes = new_figure(2, width=4.4, height=2.9)
    im = axes[0].imshow(losses.numpy(), aspect="auto", cmap="viridis")
    axes[0].set(xticks=range(len(starts)), xticklabels=[f"{s:g}" for s in starts], yticks=range(losses.shape[0]),
                xlabel=r"start epoch s of the waypoint $(\theta_s, V_T)$", ylabel="expert",
                title="(a) matching loss")
    fig.colorbar(im, ax=axes[0], label=r"$\|V_S - V_T\|^2 / \|V_T\|^2$")
    for i, row in enumerate(target_norms):
        axes[1].plot(list(starts), row.numpy(), "o-", ms=3, lw=1, color="C0", alpha=0.7,
                     label=r"expert $\|V_T(s)\|$" if i == 0 else None)
    if student_norms is not None:
        axes[1].plot(list(starts), student_norms.numpy(), "s--", ms=3, color="C3", label=r"student $\|V_S\|$ (mean)")
    axes[1].set(xlabel="start epoch s", ylabel="update-vector length", title="(b) target and student lengths",
                ylim=(0, None))
    axes[1].legend(fontsize=7)
    return fig


def accuracy_along_sgd(epoch_acc: torch.Tensor, step_epochs: torch.Tensor, step_acc: torch.Tensor,
                       ragged: torch.Tensor | None = None):
    """(a) test accuracy of every expert checkpoint theta_e; (b) after every minibatch of replayed SGD
    runs (`step_acc` (R, T), one row per run, or (T,)). `ragged` (T - 1 bools, `analysis.minibatch_sizes`)
    marks the steps taken on an epoch's short last minibatch: their end points are drawn as open circles."""
    fig, axes = new_figure(2, width=4.2)
    for i, row in enumerate(epoch_acc):
        axes[0].plot(range(len(row)), 100 * row.numpy(), marker=".", alpha=0.8, label=f"expert {i}")
    axes[0].set(xlabel="epoch e", ylabel="test accuracy (%)", title=r"(a) checkpoints $\theta_e$")
    axes[0].legend(fontsize=6)
    runs = torch.atleast_2d(step_acc)
    x = step_epochs.numpy()
    for r, row in enumerate(runs):
        axes[1].plot(x, 100 * row.numpy(), marker=".", ms=4, color=f"C{3 + r}", alpha=0.8, lw=1, label=f"run {r}")
        if ragged is not None:
            after = torch.cat([torch.zeros(1, dtype=torch.bool), ragged])
            axes[1].plot(x[after.numpy()], 100 * row[after].numpy(), "o", ms=7, mfc="none", color="k",
                         label="after the short last minibatch" if r == 0 else None)
    axes[1].set(xlabel="epoch (one dot per minibatch step)", ylabel="test accuracy (%)",
                title="(b) every SGD step of replayed runs")
    axes[1].legend(fontsize=6)
    return fig


# --- chapter 2: NTK linearisation --------------------------------------------------------------

def ntk_heatmap_and_spectrum(kernel: torch.Tensor, labels: torch.Tensor, eigvals: torch.Tensor):
    """Left: the input-by-input NTK (N, N), inputs sorted by class, class boundaries drawn.
    Right: the eigenvalues of the full Θ0 in descending order, log-log."""
    order = torch.argsort(labels, stable=True)
    k = kernel[order][:, order].detach().cpu().double()
    fig, (ax_k, ax_s) = new_figure(2)
    off = k[~torch.eye(len(k), dtype=torch.bool)]
    # the diagonal (each image with itself) is much larger; clip the scale to the off-diagonal range
    im = ax_k.imshow(k.numpy(), cmap="magma", vmin=float(off.quantile(0.01)), vmax=float(off.quantile(0.99)))
    edges = torch.nonzero(torch.diff(labels[order])).flatten() + 0.5
    for e in edges.tolist():
        ax_k.axhline(e, color="w", lw=0.4)
        ax_k.axvline(e, color="w", lw=0.4)
    ax_k.set_title("empirical NTK, images sorted by digit")
    ax_k.set_xticks([])
    ax_k.set_yticks([])
    fig.colorbar(im, ax=ax_k, shrink=0.8)
    ev = torch.sort(eigvals.detach().cpu().double(), descending=True).values.clamp_min(1e-12)
    ax_s.loglog(torch.arange(1, len(ev) + 1).numpy(), ev.numpy(), lw=1.5)
    ax_s.set_xlabel("rank i")
    ax_s.set_ylabel(r"eigenvalue $\lambda_i$ of $\Theta_0$")
    ax_s.set_title("NTK spectrum")
    ax_s.grid(alpha=0.3, which="both")
    return fig


def linearised_vs_real(run):
    """Three panels from a `ntk.PairedRun`: training loss; accuracy and prediction agreement;
    how far apart the two networks' outputs and parameters are."""
    steps = run.steps.numpy()
    fig, (ax_l, ax_a, ax_g) = new_figure(3, width=3.8)
    ax_l.plot(steps, run.real_loss.numpy(), label="real network")
    ax_l.plot(steps, run.lin_loss.numpy(), "--", label="linearised")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("gradient step")
    ax_l.set_ylabel("training loss")
    ax_l.legend()
    ax_a.plot(steps, run.real_acc.numpy(), color="C0", label="train acc, real")
    ax_a.plot(steps, run.lin_acc.numpy(), "--", color="C1", label="train acc, linearised")
    if run.real_test_acc is not None:
        ax_a.plot(steps, run.real_test_acc.numpy(), color="C0", alpha=0.5, lw=1, label="test acc, real")
        ax_a.plot(steps, run.lin_test_acc.numpy(), "--", color="C1", alpha=0.5, lw=1, label="test acc, linearised")
    ax_a.plot(steps, run.agreement().numpy(), color="k", lw=1, label="same prediction (train)")
    ax_a.set_xlabel("gradient step")
    ax_a.set_ylim(0, 1.02)
    ax_a.legend(fontsize=7)
    ax_g.plot(steps, run.output_gap().numpy(), label=r"$\|f_{real}-f_{lin}\|$ / output change")
    ax_g.plot(steps, run.param_gap().numpy(), label=r"$\|\theta_{real}-\theta_{lin}\|$ / distance travelled")
    ax_g.set_xlabel("gradient step")
    ax_g.set_ylabel("relative gap")
    ax_g.legend(fontsize=7)
    for ax in (ax_l, ax_a, ax_g):
        ax.grid(alpha=0.3)
    return fig


def closed_form_vs_discrete(steps: torch.Tensor, discrete: torch.Tensor, closed: torch.Tensor,
                            func_error: torch.Tensor, param_error: torch.Tensor, num_outputs: int = 6):
    """Left: a few training outputs f_c(x_n) of the linearised network over time, discrete gradient
    descent (dots) on the gradient-flow closed form (lines). Right: their relative difference in
    function and in parameter space."""
    t = steps.numpy()
    fig, (ax_f, ax_e) = new_figure(2)
    flat_d, flat_c = discrete.flatten(1), closed.flatten(1)
    picks = torch.argsort((flat_d[-1] - flat_d[0]).abs(), descending=True)[:num_outputs]
    for i, j in enumerate(picks.tolist()):
        ax_f.plot(t, flat_c[:, j].numpy(), color=f"C{i}", lw=1.5)
        ax_f.plot(t, flat_d[:, j].numpy(), "o", color=f"C{i}", ms=2.5)
    ax_f.set_xlabel("t (gradient steps)")
    ax_f.set_ylabel(r"output $f_c(x_n)$")
    ax_f.set_title("dots: discrete GD, lines: closed form")
    ax_e.plot(t, func_error.numpy(), label="function space")
    ax_e.plot(t, param_error.numpy(), "--", label="parameter space")
    ax_e.set_xlabel("t (gradient steps)")
    ax_e.set_ylabel("closed form − discrete (relative)")
    ax_e.legend()
    for ax in (ax_f, ax_e):
        ax.grid(alpha=0.3)
    return fig


def eigen_progress(steps: torch.Tensor, linear, real):
    """Progress p_i(t) along eigen-directions of Θ0 (two `ntk.EigenProgress`), one line per
    direction coloured by eigenvalue: left the linearised network, right the real one."""
    t = steps.numpy()
    fig, axes = new_figure(2, sharey=True)
    cmap = plt.get_cmap("viridis")
    n = len(linear.ranks)
    for ax, prog, title in ((axes[0], linear, "linearised network"), (axes[1], real, "real network")):
        for i in range(n):
            ax.plot(t, prog.progress[:, i].numpy(), color=cmap(i / max(n - 1, 1)),
                    label=f"rank {int(prog.ranks[i])}, λ={float(prog.eigvals[i]):.3g}")
        ax.axhline(1, color="k", lw=0.5)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(-1.0, 2.0)  # a real-network curve can leave this band; the linear ones stay in [0, 1]
        ax.set_xscale("symlog", linthresh=max(float(t[1]) if len(t) > 1 else 1.0, 1.0))
        ax.set_xlim(0, float(t[-1]))
        ax.set_xticks([0] + [10**k for k in range(1, len(str(int(t[-1]))))])
        ax.set_xlabel("t (gradient steps)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r"progress $p_i(t)$ along $v_i$")
    axes[0].legend(fontsize=6)
    return fig


def chord_distance_and_accuracy(distances: list[torch.Tensor], along: list[torch.Tensor], path_acc: torch.Tensor,
                                s: torch.Tensor, chord_acc: torch.Tensor, small_paths: dict | None = None,
                                expert_references: dict | None = None):
    """Distance from the chord θ_0 → θ_end relative to its length, each panel on one time axis, and
    accuracy along the chord. (a) The small ConvNet's paths {label: (steps, distance)} against the
    gradient step; each gets its own style and marker, so curves that coincide stay visible. (b) Each
    expert's SGD checkpoints against the epoch, with references {label: (epochs, distance)} (a
    full-batch expert, one step per epoch). (c) Test accuracy along the chord θ_0 + s(θ_E − θ_0)
    (mean, min–max band over experts), and along each SGD path with epoch e placed at its position
    s_e along the chord (`along`)."""
    fig, (ax_s, ax_d, ax_a) = new_figure(3, width=3.7)
    styles = [("-", None, 2.6), ("--", "o", 1.2), ("-", None, 1.0), (":", "x", 1.4)]
    for j, (label, (x, d)) in enumerate((small_paths or {}).items()):
        ls, marker, lw = styles[j % len(styles)]
        ax_s.plot(x.numpy(), d.numpy(), ls=ls, marker=marker, markevery=max(1, len(x) // 12), ms=3.5, mfc="none",
                  lw=lw, color=f"C{j + 1}", alpha=0.9, label=label)
    ax_s.set(xlabel="gradient step t", ylabel=r"distance from chord / $\|\theta_T-\theta_0\|$",
             title="(a) small ConvNet", ylim=(0, None))
    ax_s.legend(fontsize=6)
    for i, d in enumerate(distances):
        ax_d.plot(range(len(d)), d.numpy(), "o-", ms=2, color="C0", alpha=0.7, lw=1, label="SGD experts" if i == 0 else None)
    for j, (label, (x, d)) in enumerate((expert_references or {}).items()):
        ax_d.plot(x.numpy(), d.numpy(), "s--", ms=3.5, mfc="none", color=f"C{j + 5}", lw=1.5, label=label)
    ax_d.set(xlabel="epoch e", ylabel=r"distance from chord / $\|\theta_E-\theta_0\|$",
             title="(b) experts, width 64", ylim=(0, None))
    ax_d.legend(fontsize=6)
    for i, (a, acc) in enumerate(zip(along, path_acc)):
        ax_a.plot(a.numpy(), acc.numpy(), "o-", ms=2.5, lw=1, color="C0", alpha=0.6,
                  label="SGD path, epoch e at its $s_e$" if i == 0 else None)
    ax_a.plot(s.numpy(), chord_acc.mean(0).numpy(), "s-", ms=3, color="C3", label="on the chord (mean)")
    ax_a.fill_between(s.numpy(), chord_acc.min(0).values.numpy(), chord_acc.max(0).values.numpy(),
                      color="C3", alpha=0.2)
    ax_a.set(xlabel=r"position along the chord $s$", ylabel="test accuracy", title="(c) experts: accuracy")
    ax_a.legend(fontsize=6)
    for ax in (ax_s, ax_d, ax_a):
        ax.grid(alpha=0.3)
    return fig


# --- chapter 3: convexified trajectories -------------------------------------------------------

def beta_schedules(betas: dict, layers: dict, waypoint_epochs, errors: dict):
    """(a) beta_l(e) per layer for each schedule (line style = schedule, colour = layer), each segment
    drawn from 0 at its first epoch to 1 at its last (the table stores the next segment's 0 there),
    waypoints dotted; (b) distance of the record from the SGD checkpoints, per epoch, for each schedule."""
    fig, axes = new_figure(2, width=4.6)
    styles = ["-", "--", ":", "-."]
    w = list(waypoint_epochs)
    for (name, beta), style in zip(betas.items(), styles):
        for c, (label, l) in enumerate(layers.items()):
            for i, (a, b) in enumerate(zip(w[:-1], w[1:])):
                values = torch.cat([beta[a:b, l].double(), torch.ones(1, dtype=torch.float64)])
                axes[0].plot(range(a, b + 1), values.numpy(), style, color=f"C{c}",
                             marker="." if style == "-" else None,
                             label=label if style == "-" and i == 0 else None)
        axes[0].plot([], [], style, color="grey", label=name)
    for x in w:
        axes[0].axvline(x, color="grey", lw=0.5, ls=":")
        axes[1].axvline(x, color="grey", lw=0.5, ls=":")
    axes[0].set(xlabel="epoch e", ylabel=r"$\beta_l(e)$", title="(a) progress within each segment")
    axes[0].legend(fontsize=6, ncol=2)
    for (name, err), style in zip(errors.items(), styles):
        axes[1].plot(range(len(err)), err.numpy(), style, marker=".", label=name)
    axes[1].set(xlabel="epoch e", ylabel=r"$\|\theta_e - \hat\theta(e)\| / \|\theta_e - \theta_0\|$",
                title="(b) distance from the SGD checkpoints")
    axes[1].legend(fontsize=7)
    return fig


def window_fidelity_panels(fidelities: dict, window_epochs: float, sgd_noise: dict | None = None,
                           spreads: dict | None = None):
    """Window-level fidelity of convexified records against SGD (`analysis.WindowFidelity`), per start
    epoch: (a) cos(V_record, V_SGD), (b) ||V_record|| / ||V_SGD||, (c) the matching loss between the
    two targets, with SGD's own noise in the same units if given ({label: (starts, values)}, e.g. the
    loss between two SGD runs from one theta_0, `analysis.pairwise_losses`). `fidelities` maps a label
    to a list of WindowFidelity, one per expert; lines are the mean over experts, bands min to max.
    With `spreads` ({label: (starts, values)}, `analysis.window_spread`), a fourth panel (d) shows how
    much each kind of target varies across experts that differ only in their SGD noise."""
    fig, axes = new_figure(4 if spreads else 3, width=3.4)
    for c, (label, fids) in enumerate(fidelities.items()):
        x = fids[0].starts.numpy()
        for ax, field in zip(axes, ("cosine", "norm_ratio", "loss")):
            values = torch.stack([getattr(f, field) for f in fids])
            ax.plot(x, values.mean(0).numpy(), "o-", ms=3, color=f"C{c}", label=label)
            ax.fill_between(x, values.min(0).values.numpy(), values.max(0).values.numpy(), color=f"C{c}", alpha=0.2)
    axes[0].set(xlabel="window start s (epoch)", ylabel=r"cos($V_T^{record}$, $V_T^{SGD}$)",
                title=f"(a) direction, M = {window_epochs:g}", ylim=(0, 1.02))
    axes[1].axhline(1, color="grey", lw=0.6)
    axes[1].set(xlabel="window start s (epoch)", ylabel=r"$\|V_T^{record}\| / \|V_T^{SGD}\|$",
                title="(b) length", ylim=(0, None))
    for label, (x, y) in (sgd_noise or {}).items():
        axes[2].plot(list(x), torch.as_tensor(y).numpy(), "k--", marker="x", ms=4, lw=1, label=label)
    axes[2].set(xlabel="window start s (epoch)", ylabel=r"$\|V^{record} - V^{SGD}\|^2 / \|V^{SGD}\|^2$",
                title="(c) as a matching loss", ylim=(0, None))
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6)
    if spreads:
        for c, (label, (x, y)) in enumerate(spreads.items()):
            axes[3].plot(list(x), torch.as_tensor(y).numpy(), "o-" if c else "x--", ms=3.5,
                         color="k" if c == 0 else f"C{c - 1}", label=label)
        axes[3].set(xlabel="window start s (epoch)", ylabel=r"spread of $V_T$ across SGD runs (noise floor)",
                    title="(d) same $\\theta_0$, other data order", ylim=(0, None))
        axes[3].legend(fontsize=6)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def paths_2d(panels: list[dict]):
    """SGD checkpoints and convexified paths in a 2-D PCA projection, one panel per expert.

    Each panel is {"title": str, "sgd": (E+1, 2), "paths": {label: (T, 2)}, "waypoints": {label: (K, 2)}}."""
    fig, axes = new_figure(len(panels), width=4.4, height=3.6, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sgd = panel["sgd"].numpy()
        ax.plot(sgd[:, 0], sgd[:, 1], "-o", color="k", ms=3, lw=0.8, label=r"SGD $\theta_e$")
        ax.annotate(r"$\theta_0$", sgd[0], fontsize=8)
        ax.annotate(r"$\theta_E$", sgd[-1], fontsize=8)
        for c, (label, path) in enumerate(panel["paths"].items()):
            xy = path.numpy()
            ax.plot(xy[:, 0], xy[:, 1], color=f"C{c}", lw=1.6, alpha=0.85, label=label)
            way = panel["waypoints"].get(label)
            if way is not None:
                ax.plot(way[:, 0], way[:, 1], "s", color=f"C{c}", ms=6, mfc="none")
        ax.set(xlabel="PC 1", ylabel="PC 2", title=panel["title"])
        ax.legend(fontsize=7)
    return fig


def accuracy_paths(sgd_epochs, sgd_acc: torch.Tensor, curves: dict):
    """Test accuracy along the SGD checkpoints (markers) and along convexified paths at continuous tau."""
    fig, ax = new_figure(1, width=5.2, height=3.4)
    ax.plot(sgd_epochs, 100 * sgd_acc.numpy(), "o-", color="k", ms=4, lw=0.8, label=r"SGD checkpoints $\theta_e$")
    for c, (label, (taus, acc)) in enumerate(curves.items()):
        ax.plot(taus, 100 * acc.numpy(), color=f"C{c}", lw=1.6, label=label)
    ax.set(xlabel=r"epoch $e$ / continuous time $\tau$", ylabel="test accuracy (%)")
    ax.legend(fontsize=7)
    return fig


def window_histograms(samples: dict, epochs: int):
    """Histograms of tau_start and tau_target for each sampling rule (samples: name -> (n, 2))."""
    fig, axes = new_figure(2, width=4.2)
    bins = torch.linspace(0, epochs, 4 * epochs + 1).numpy()
    for c, (name, draws) in enumerate(samples.items()):
        for k, ax in enumerate(axes):
            ax.hist(draws[:, k].numpy(), bins=bins, alpha=0.55, color=f"C{c}", label=name)
    axes[0].set(xlabel=r"$\tau_{start}$", ylabel="draws", title="(a) start")
    axes[1].set(xlabel=r"$\tau_{target}$", title="(b) target")
    axes[0].legend(fontsize=7)
    return fig


# --- chapter 4: experiments --------------------------------------------------------------------

METHOD_COLORS = {"MTT": "C0", "MCT": "C3"}


def _moving_average(values, window: int):
    """Trailing mean over `window` points (display smoothing only)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def convergence(curves: dict, window: int = 10):
    """(a) test accuracy vs iteration, mean over seeds with a +-1 std band; (b) matching loss vs
    iteration, each seed thin and its moving average thick. `curves[label]` is Comparison.curves(label)."""
    fig, axes = new_figure(2, width=4.4)
    for label, c in curves.items():
        color = METHOD_COLORS.get(label)
        it = c["iterations"]
        mean = [100 * m for m in c["acc_mean"]]
        std = [100 * s for s in c["acc_std"]]
        axes[0].plot(it, mean, marker="o", color=color, label=f"{label} ({len(c['seeds'])} seeds)")
        axes[0].fill_between(it, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             color=color, alpha=0.2)
        for i, losses in enumerate(c["losses"]):
            x = range(1, len(losses) + 1)
            axes[1].plot(x, losses, color=color, alpha=0.25, lw=0.7)
            axes[1].plot(x, _moving_average(losses, window), color=color, lw=1.6,
                         label=label if i == 0 else None)
    axes[0].set(xlabel="iteration", ylabel="test accuracy (%)", title="(a) accuracy of the synthetic set")
    axes[1].set(xlabel="iteration", ylabel="matching loss", title=f"(b) loss ({window}-iteration mean thick)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    return fig


def per_seed_accuracy(panels: dict, full_data: float | None = None, links: list[tuple[str, str]] | None = None):
    """One panel per IPC: every random real subset and every seed's accuracy in each group as a dot, the
    mean +- sample std as a bar beside them, and grey lines joining the same seed's dots in the linked
    groups (what a paired difference compares; default: consecutive seeded groups). `panels[ipc]` =
    {"random real": [acc, ...], label: {seed: acc, ...}, ...} (fractions); the full data dashed."""
    fig, axes = new_figure(len(panels), width=3.6, squeeze=False)
    for ax, (ipc, groups) in zip(axes[0], panels.items()):
        names = list(groups)
        for i, name in enumerate(names):
            values = groups[name]
            accs = [100 * v for v in (values.values() if isinstance(values, dict) else values)]
            color = METHOD_COLORS.get(name.split(" ")[0], "0.45")
            ax.scatter([i - 0.08] * len(accs), accs, s=14, color=color, zorder=3)
            if len(accs) > 1:
                ax.errorbar(i + 0.12, statistics.fmean(accs), yerr=statistics.stdev(accs), fmt="s", ms=4,
                            color=color, capsize=3)
        methods = [n for n in names if isinstance(groups[n], dict)]
        for a, b in links or list(zip(methods, methods[1:])):
            ia, ib = names.index(a), names.index(b)
            for seed in sorted(set(groups[a]) & set(groups[b])):
                ax.plot([ia - 0.08, ib - 0.08], [100 * groups[a][seed], 100 * groups[b][seed]], color="0.75",
                        lw=0.7, zorder=1)
        if full_data is not None:
            ax.axhline(100 * full_data, color="k", ls="--", lw=1, label="full data")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n") for n in names], fontsize=7)
        ax.set(xlim=(-0.5, len(names) - 0.5), title=f"IPC {ipc}", ylabel="test accuracy (%)")
    return fig


def synthetic_rows(sets: dict, num_classes: int, per_class: int = 1, class_names: list[str] | None = None):
    """Display-ready synthetic sets (values in [0, 1]) one above the other: for each named set
    (images, labels), `per_class` rows with one column per class, the set's name on its first row."""
    names = list(sets)
    nrow = len(names) * per_class
    fig, axes = plt.subplots(nrow, num_classes, figsize=(0.8 * num_classes + 0.9, 0.8 * nrow + 0.2), squeeze=False,
                             constrained_layout=True)
    for s, name in enumerate(names):
        images, labels = sets[name]
        images = images.detach().cpu().clamp(0, 1)
        for c in range(num_classes):
            members = torch.nonzero(labels.cpu() == c).flatten()[:per_class]
            for k in range(per_class):
                ax = axes[s * per_class + k, c]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(members):
                    img = images[members[k]].permute(1, 2, 0).squeeze(-1).numpy()
                    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
                if s == 0 and k == 0:
                    ax.set_title(class_names[c] if class_names else str(c), fontsize=8)
                if c == 0 and k == 0:
                    ax.set_ylabel(name, fontsize=8)
    return fig


def ablation_panels(ablations: dict):
    """One column per ablation: (top) final matching loss (mean of the last 10 iterations),
    (bottom) final test accuracy, one point per variant (axes are not zero-based: compare within a
    column). `ablations[name]` is a list of summary rows."""
    n = len(ablations)
    fig, axes = plt.subplots(2, n, figsize=(2.9 * n, 4.8), constrained_layout=True, squeeze=False)
    for j, (name, rows) in enumerate(ablations.items()):
        labels = [r["label"] for r in rows]
        for i, (key, ylabel) in enumerate((("final_loss_mean", "final matching loss"),
                                           ("final_acc_mean", "final test accuracy (%)"))):
            scale = 100 if key.startswith("final_acc") else 1
            values = [scale * r[key] for r in rows]
            ax = axes[i, j]
            ax.plot(range(len(values)), values, color="0.7", lw=1, zorder=1)
            ax.scatter(range(len(values)), values, color=[f"C{k + 2}" for k in range(len(values))], s=40, zorder=2)
            for k, v in enumerate(values):
                ax.annotate(f"{v:.3g}", (k, v), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7)
            ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=20)
            ax.set_xlim(-0.5, len(values) - 0.5)
            ax.margins(y=0.3)
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(name.replace("_", " "))
    return fig
