//! The mathematics of DDPM checked from first principles: the closed-form forward process, the
//! posterior mean, the prediction conversions, and samplers driven by the exact optimal noise
//! predictor of a known 1-D distribution recovering that distribution.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use sd_rs::sampler::{
    DdimSampler, DdpmSampler, DpmSolverMultistepSampler, EulerAncestralSampler, EulerSampler,
    NoiseSource, Sampler, SeededNoise,
};
use sd_rs::schedule::{NoiseSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

const T: usize = 1000;

/// The DDPM paper's schedule (diffusers' defaults): linear betas 1e-4..0.02 over 1000 steps.
fn default_schedule() -> NoiseSchedule {
    NoiseSchedule::new(&SchedulerConfig::default()).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    SeededNoise::new(seed)
        .sample(shape, DType::F64, &Device::Cpu)
        .unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn closed_form_forward_process_equals_the_iterated_chain() {
    let s = default_schedule();
    // Exact recursion of the Gaussian chain x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps:
    // mean m_t = sqrt(alpha_t) m_{t-1}, variance v_t = alpha_t v_{t-1} + beta_t, from x_{-1} = x0.
    let x0 = 1.7;
    let (mut m, mut v) = (x0, 0.0);
    let mut worst = (0f64, 0f64);
    for t in 0..T {
        m *= s.alphas()[t].sqrt();
        v = s.alphas()[t] * v + s.betas()[t];
        let abar = s.alphas_cumprod()[t];
        worst.0 = worst.0.max((m - abar.sqrt() * x0).abs());
        worst.1 = worst.1.max((v - (1.0 - abar)).abs());
    }
    println!(
        "recursion vs closed form: mean {:.1e}, variance {:.1e}",
        worst.0, worst.1
    );
    assert!(worst.0 < 1e-12 && worst.1 < 1e-12, "{worst:?}");

    // Monte Carlo: simulate the chain step by step and compare with q_sample at the same t.
    let n = 20_000;
    let checkpoints = [0usize, 9, 99, 499, 999];
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut x = vec![x0; n];
    let mut chain_stats = Vec::new();
    for t in 0..T {
        let (sa, sb) = (s.alphas()[t].sqrt(), s.betas()[t].sqrt());
        for xi in x.iter_mut() {
            let z: f64 = StandardNormal.sample(&mut rng);
            *xi = sa * *xi + sb * z;
        }
        if checkpoints.contains(&t) {
            chain_stats.push((t, mean_var(&x)));
        }
    }
    let x0s = Tensor::full(x0, n, &Device::Cpu).unwrap();
    for (t, (mean, var)) in chain_stats {
        let abar = s.alphas_cumprod()[t];
        let (m_true, v_true) = (abar.sqrt() * x0, 1.0 - abar);
        let ts = Tensor::full(t as u32, n, &Device::Cpu).unwrap();
        let direct = f64s(&s.q_sample(&x0s, &ts, &randn(&[n], 12 + t as u64)).unwrap());
        let (dm, dv) = mean_var(&direct);
        // Standard errors of a sample mean and variance of n Gaussian draws: sqrt(v/n) and
        // v sqrt(2/(n-1)); both estimates must be within 5 of them.
        let (se_m, se_v) = (
            (v_true / n as f64).sqrt(),
            v_true * (2.0 / (n - 1) as f64).sqrt(),
        );
        println!("t={t}: chain ({mean:.4}, {var:.4}), q_sample ({dm:.4}, {dv:.4}), exact ({m_true:.4}, {v_true:.4})");
        for (m, v) in [(mean, var), (dm, dv)] {
            assert!(
                (m - m_true).abs() < 5.0 * se_m,
                "t={t}: mean {m} vs {m_true}"
            );
            assert!(
                (v - v_true).abs() < 5.0 * se_v,
                "t={t}: variance {v} vs {v_true}"
            );
        }
    }
}

fn mean_var(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var)
}

#[test]
fn alpha_cumprod_at_t_is_near_zero_for_the_default_schedule() {
    let s = default_schedule();
    // prod (1 - beta_t) for beta_t = 1e-4 + (0.02 - 1e-4) t / 999, in f64.
    let exact: f64 = (0..T)
        .map(|t| 1.0 - (1e-4 + (0.02 - 1e-4) * t as f64 / 999.0))
        .product();
    let abar_t = s.alphas_cumprod()[T - 1];
    println!("abar_T = {abar_t:.4e} (f64 product {exact:.4e})");
    assert!(abar_t > 0.0 && abar_t < 1e-4, "{abar_t}");
    assert!((abar_t - exact).abs() / exact < 1e-4);
    // Betas are float32 like diffusers' (and 1 - beta is rounded to float32: half an ulp of 1).
    assert!((s.betas()[0] - 1e-4).abs() < 1e-7 && (s.betas()[T - 1] - 0.02).abs() < 1e-7);
    // SNR decreases monotonically from ~1e4 to ~4e-5.
    assert!((1..T).all(|t| s.snr(t) < s.snr(t - 1)));
}

#[test]
fn posterior_mean_of_predicted_x0_is_the_eps_parameterisation() {
    let s = default_schedule();
    let ts: Vec<u32> = vec![0, 1, 2, 17, 250, 500, 998, 999];
    let b = ts.len();
    let t = Tensor::new(ts.as_slice(), &Device::Cpu).unwrap();
    let x_t = randn(&[b, 3, 2, 2], 1);
    let eps = randn(&[b, 3, 2, 2], 2);
    let x0 = s.x0_from_eps(&x_t, &t, &eps).unwrap();
    let mu = f64s(&s.posterior_mean(&x0, &x_t, &t).unwrap());
    // mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps), per sample.
    let (xv, ev) = (f64s(&x_t), f64s(&eps));
    let per = xv.len() / b;
    let mut expected = Vec::new();
    for (i, &tt) in ts.iter().enumerate() {
        let tt = tt as usize;
        let (alpha, beta, abar) = (s.alphas()[tt], s.betas()[tt], s.alphas_cumprod()[tt]);
        for j in 0..per {
            let k = i * per + j;
            expected.push((xv[k] - beta / (1.0 - abar).sqrt() * ev[k]) / alpha.sqrt());
        }
    }
    let d = max_abs_diff(&mu, &expected);
    println!("posterior mean vs eps form: max abs diff {d:.2e}");
    // An identity: equal to f64 rounding, magnified by 1 / (1 - abar_t) ~ 1e4 at t = 0.
    assert!(d < 1e-10, "{d}");

    // fixed_small variance is beta_tilde; at t = 0 it is 0 and fixed_large is beta.
    use sd_rs::schedule::VarianceType::{FixedLarge, FixedSmall};
    assert_eq!(s.posterior_variance(0, FixedSmall), 0.0);
    for tt in [1usize, 100, 999] {
        let bt =
            (1.0 - s.alphas_cumprod()[tt - 1]) / (1.0 - s.alphas_cumprod()[tt]) * s.betas()[tt];
        assert!((s.posterior_variance(tt, FixedSmall) - bt).abs() < 1e-15);
        assert_eq!(s.posterior_variance(tt, FixedLarge), s.betas()[tt]);
        assert!(bt < s.betas()[tt]);
    }
}

#[test]
fn q_sample_with_a_timestep_per_sample_equals_scalar_computation() {
    let s = default_schedule();
    let ts: Vec<i64> = vec![0, 1, 250, 998, 999];
    let b = ts.len();
    let x0 = randn(&[b, 4, 3, 3], 3);
    let eps = randn(&[b, 4, 3, 3], 4);
    for dtype in [DType::F32, DType::F64] {
        let (x0, eps) = (x0.to_dtype(dtype).unwrap(), eps.to_dtype(dtype).unwrap());
        for t in [
            Tensor::new(ts.as_slice(), &Device::Cpu).unwrap(),
            Tensor::new(
                ts.iter().map(|&t| t as u32).collect::<Vec<_>>(),
                &Device::Cpu,
            )
            .unwrap(),
        ] {
            let noisy = s.q_sample(&x0, &t, &eps).unwrap();
            assert_eq!(noisy.dims(), x0.dims());
            assert_eq!(noisy.dtype(), dtype);
            for (i, &tt) in ts.iter().enumerate() {
                let abar = s.alphas_cumprod()[tt as usize];
                let want: Vec<f64> = f64s(&x0.get(i).unwrap())
                    .iter()
                    .zip(f64s(&eps.get(i).unwrap()))
                    .map(|(x, e)| abar.sqrt() * x + (1.0 - abar).sqrt() * e)
                    .collect();
                let d = max_abs_diff(&f64s(&noisy.get(i).unwrap()), &want);
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
                assert!(d < tol, "{dtype:?} sample {i} (t={tt}): {d}");
            }
        }
    }
}

#[test]
fn eps_x0_and_v_conversions_round_trip() {
    for prediction_type in [
        PredictionType::Epsilon,
        PredictionType::Sample,
        PredictionType::VPrediction,
    ] {
        let cfg = SchedulerConfig {
            prediction_type,
            ..SchedulerConfig::default()
        };
        let s = NoiseSchedule::new(&cfg).unwrap();
        let ts: Vec<u32> = vec![0, 5, 300, 700, 999];
        let t = Tensor::new(ts.as_slice(), &Device::Cpu).unwrap();
        let x0 = randn(&[5, 2, 4], 5);
        let eps = randn(&[5, 2, 4], 6);
        let x_t = s.q_sample(&x0, &t, &eps).unwrap();
        let v = s.velocity(&x0, &eps, &t).unwrap();
        let checks = [
            ("x0_from_eps", s.x0_from_eps(&x_t, &t, &eps).unwrap(), &x0),
            ("eps_from_x0", s.eps_from_x0(&x_t, &t, &x0).unwrap(), &eps),
            ("x0_from_v", s.x0_from_v(&x_t, &t, &v).unwrap(), &x0),
            ("eps_from_v", s.eps_from_v(&x_t, &t, &v).unwrap(), &eps),
            ("v_from_eps", s.v_from_eps(&x_t, &t, &eps).unwrap(), &v),
        ];
        for (name, got, want) in checks {
            let d = max_abs_diff(&f64s(&got), &f64s(want));
            // Dividing by sqrt(abar_999) ~ 6e-3 (or sqrt(1 - abar_0) ~ 1e-2) magnifies f64
            // rounding a hundredfold; still far below any real error.
            assert!(d < 1e-9, "{prediction_type}: {name} off by {d}");
        }
        // The training target and its inverse.
        let target = s.training_target(&x0, &eps, &t).unwrap();
        let (x0_back, eps_back) = s.x0_and_eps(&target, &x_t, &t).unwrap();
        assert!(
            max_abs_diff(&f64s(&x0_back), &f64s(&x0)) < 1e-9,
            "{prediction_type}"
        );
        assert!(
            max_abs_diff(&f64s(&eps_back), &f64s(&eps)) < 1e-9,
            "{prediction_type}"
        );
        // v^2 + ... : |v|^2 = abar |eps|^2 + (1-abar)|x0|^2 - 2 sqrt(abar(1-abar)) eps.x0, and
        // x_t, v are an orthonormal rotation of (x0, eps).
        let (xt_v, v_v, x0_v, e_v) = (f64s(&x_t), f64s(&v), f64s(&x0), f64s(&eps));
        for k in 0..xt_v.len() {
            let lhs = xt_v[k].powi(2) + v_v[k].powi(2);
            let rhs = x0_v[k].powi(2) + e_v[k].powi(2);
            assert!((lhs - rhs).abs() < 1e-9);
        }
    }
}

/// A known data distribution: a mixture of two 1-D Gaussians.
struct Mixture {
    weights: [f64; 2],
    means: [f64; 2],
    stds: [f64; 2],
}

const DATA: Mixture = Mixture {
    weights: [0.3, 0.7],
    means: [-2.0, 1.5],
    stds: [0.3, 0.5],
};

impl Mixture {
    /// The exact optimal noise predictor eps*(x_t, t) = -sqrt(1 - abar) d/dx log p_t(x), where
    /// p_t is the mixture noised to level abar: components N(sqrt(abar) mu_k,
    /// abar s_k^2 + 1 - abar).
    fn optimal_eps(&self, x: f64, abar: f64) -> f64 {
        let mut log_r = [0f64; 2];
        let mut scores = [0f64; 2];
        for k in 0..2 {
            let mean = abar.sqrt() * self.means[k];
            let var = abar * self.stds[k].powi(2) + 1.0 - abar;
            log_r[k] = self.weights[k].ln() - 0.5 * var.ln() - 0.5 * (x - mean).powi(2) / var;
            scores[k] = -(x - mean) / var;
        }
        let m = log_r[0].max(log_r[1]);
        let r: Vec<f64> = log_r.iter().map(|l| (l - m).exp()).collect();
        let score = (r[0] * scores[0] + r[1] * scores[1]) / (r[0] + r[1]);
        -(1.0 - abar).sqrt() * score
    }

    fn mean(&self) -> f64 {
        (0..2).map(|k| self.weights[k] * self.means[k]).sum()
    }

    /// Central moments 2 and 4 of the mixture (for the standard error of the sample variance).
    fn central_moments(&self) -> (f64, f64) {
        let mu = self.mean();
        let (mut m2, mut m4) = (0.0, 0.0);
        for k in 0..2 {
            let (d, s2) = (self.means[k] - mu, self.stds[k].powi(2));
            m2 += self.weights[k] * (d * d + s2);
            m4 += self.weights[k] * (d.powi(4) + 6.0 * d * d * s2 + 3.0 * s2 * s2);
        }
        (m2, m4)
    }
}

/// Runs `sampler` from seeded noise with `model` giving the noise prediction from the model
/// input and the integer timestep; returns the final 1-D samples.
fn run_sampler(
    sampler: &mut dyn Sampler,
    n: usize,
    seed: u64,
    model: &dyn Fn(f64, usize) -> f64,
) -> Vec<f64> {
    let mut noise = SeededNoise::new(seed);
    let mut x = (noise.sample(&[n], DType::F32, &Device::Cpu).unwrap()
        * sampler.init_noise_sigma())
    .unwrap();
    for i in 0..sampler.timesteps().len() {
        let t = sampler.timesteps()[i];
        assert_eq!(
            t.fract(),
            0.0,
            "the exact predictor needs integer timesteps"
        );
        let x_in = f64s(&sampler.scale_model_input(&x, i).unwrap());
        let eps: Vec<f32> = x_in.iter().map(|&v| model(v, t as usize) as f32).collect();
        let eps = Tensor::from_vec(eps, n, &Device::Cpu).unwrap();
        x = sampler.step(&eps, i, &x, &mut noise).unwrap();
    }
    f64s(&x)
}

/// How far samples are from DATA, in standard errors: the worst of the mean, the variance, the
/// weight of the left mode and the spread of each mode.
///
/// Tolerance reasoning: with n = 20 000 independent samples each statistic is approximately
/// normal around its population value with the standard error computed below, so a correct
/// sampler lands within 5 standard errors except with probability ~1e-6 per statistic (and the
/// seeds are fixed, so the test is deterministic). The samplers' discretisation bias (1000 DDPM
/// steps, 250 DDIM/Euler steps, 500 Euler a steps, 50 DPM++ 2M steps on this 1-D problem)
/// measured below 3 standard errors. A wrong sampler or predictor is off by tens of standard errors.
fn mixture_deviation(name: &str, samples: &[f64]) -> f64 {
    let n = samples.len() as f64;
    let (mean, var) = mean_var(samples);
    let (m2, m4) = DATA.central_moments();
    // The modes are 3.5 apart with stds 0.3 and 0.5: split at -0.5, which lies 5 stds from the
    // left mode and 4 from the right, so the split misassigns ~3e-5 of the mass.
    let left: Vec<f64> = samples.iter().cloned().filter(|&x| x < -0.5).collect();
    let right: Vec<f64> = samples.iter().cloned().filter(|&x| x >= -0.5).collect();
    let w_left = left.len() as f64 / n;
    let (_, var_l) = mean_var(&left);
    let (_, var_r) = mean_var(&right);
    // Standard errors: mean sqrt(m2/n); variance sqrt((m4 - m2^2)/n); a proportion
    // sqrt(w(1-w)/n); a Gaussian component's std s/sqrt(2 n_k).
    let w = DATA.weights[0];
    let devs = [
        ("mean", mean, DATA.mean(), (m2 / n).sqrt()),
        ("variance", var, m2, ((m4 - m2 * m2) / n).sqrt()),
        ("left weight", w_left, w, (w * (1.0 - w) / n).sqrt()),
        (
            "left std",
            var_l.sqrt(),
            DATA.stds[0],
            DATA.stds[0] / (2.0 * left.len() as f64).sqrt(),
        ),
        (
            "right std",
            var_r.sqrt(),
            DATA.stds[1],
            DATA.stds[1] / (2.0 * right.len() as f64).sqrt(),
        ),
    ];
    let mut worst = 0f64;
    for (what, got, want, se) in devs {
        let z = (got - want).abs() / se;
        println!("{name}: {what} {got:.4} (data {want:.4}, {z:.1} standard errors)");
        worst = if z.is_nan() {
            f64::INFINITY
        } else {
            worst.max(z)
        };
    }
    worst
}

/// Asserts that samples follow DATA within 5 standard errors on every statistic.
fn check_mixture(name: &str, samples: &[f64]) {
    let z = mixture_deviation(name, samples);
    assert!(z < 5.0, "{name}: off by {z:.1} standard errors");
}

fn mixture_config() -> SchedulerConfig {
    // No clipping: the data lives outside [-1, 1].
    SchedulerConfig {
        clip_sample: Some(false),
        ..SchedulerConfig::default()
    }
}

const N_SAMPLES: usize = 20_000;

#[test]
fn ddpm_and_euler_a_with_the_exact_predictor_recover_a_two_gaussian_mixture() {
    let cfg = mixture_config();
    let schedule = NoiseSchedule::new(&cfg).unwrap();
    let abar = schedule.alphas_cumprod().to_vec();
    let exact = |x: f64, t: usize| DATA.optimal_eps(x, abar[t]);
    // Full chain: 1000 ancestral steps, Algorithm 2 of Ho et al. with sigma_t^2 = beta_tilde.
    let mut ddpm = DdpmSampler::new(&cfg, T).unwrap();
    assert_eq!(ddpm.timesteps()[0], 999.0);
    assert_eq!(*ddpm.timesteps().last().unwrap(), 0.0);
    let samples = run_sampler(&mut ddpm, N_SAMPLES, 1234, &exact);
    check_mixture("DDPM 1000 steps", &samples);

    // The check has teeth: the exact predictor of other data (N(0, 1), for which
    // eps* = sqrt(1 - abar) x_t) must fail it.
    let wrong = |x: f64, t: usize| x * (1.0 - abar[t]).sqrt();
    let mut ddpm = DdpmSampler::new(&cfg, T).unwrap();
    let bad = run_sampler(&mut ddpm, N_SAMPLES, 1234, &wrong);
    assert!(mixture_deviation("wrong predictor", &bad) > 20.0);

    // Euler ancestral, the other stochastic sampler ("leading" spacing for integer timesteps).
    // Its first-order bias shrinks the mode stds by ~3.5% (4 standard errors) at 250 steps and
    // by half that at 500, so it gets 500.
    let cfg_leading = SchedulerConfig {
        timestep_spacing: Some(TimestepSpacing::Leading),
        ..cfg.clone()
    };
    let mut euler_a = EulerAncestralSampler::new(&cfg_leading, 500).unwrap();
    let samples = run_sampler(&mut euler_a, N_SAMPLES, 4321, &exact);
    check_mixture("Euler a, 500 steps", &samples);
}

#[test]
fn deterministic_samplers_with_the_exact_predictor_recover_the_mixture() {
    let cfg = mixture_config();
    let schedule = NoiseSchedule::new(&cfg).unwrap();
    let abar = schedule.alphas_cumprod().to_vec();
    let exact = |x: f64, t: usize| DATA.optimal_eps(x, abar[t]);

    // DDIM eta = 0 integrates the probability-flow ODE; 250 steps keep its discretisation error
    // within the statistical tolerance.
    let mut ddim = DdimSampler::new(&cfg, 250, 0.0).unwrap();
    let samples = run_sampler(&mut ddim, N_SAMPLES, 99, &exact);
    check_mixture("DDIM eta=0, 250 steps", &samples);

    // DPM-Solver++(2M), second order: 50 steps.
    let mut dpm = DpmSolverMultistepSampler::new(&cfg, 50, false).unwrap();
    let samples = run_sampler(&mut dpm, N_SAMPLES, 7, &exact);
    check_mixture("DPM++ 2M, 50 steps", &samples);

    // Euler with "leading" spacing has integer timesteps the exact predictor can use.
    let cfg_leading = SchedulerConfig {
        timestep_spacing: Some(TimestepSpacing::Leading),
        ..cfg.clone()
    };
    let mut euler = EulerSampler::new(&cfg_leading, 250).unwrap();
    let samples = run_sampler(&mut euler, N_SAMPLES, 5, &exact);
    check_mixture("Euler, 250 steps", &samples);
}
