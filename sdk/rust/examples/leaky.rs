//! A leaking training loop supervised through the Rust SDK (no mlx-rs here: a tiny linear model in plain Rust).
//!
//! `leaky [--steps N] [--leak-mb MIB] [--step-ms MS] [--batch B] [--eval-every N --eval-ms MS]`: every step
//! allocates and touches MIB mebibytes that are never freed, the way the leaking mlx-rs loop this project was written for grows
//! 50-100 MB per step. Under `mlxsupd` the process is recycled before its budget, resumes from its
//! checkpoint (weights and optimizer state, restored exactly), and reaches its last step.
//!
//! In an mlx-rs loop the calls sit in the same places: `resume` loads the safetensors the checkpoint
//! directory holds, `save` writes the model's and the optimizer's arrays there with mlx-rs, `clear_cache`
//! calls MLX's cache clearing, and `end_step` follows `optimizer.update` + `eval`. A long validation pass
//! runs inside `session.busy()`, so the daemon gets heartbeats meanwhile.

use std::fs;
use std::io;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use mlxsup_worker::{Next, Session, StepStats, TrainState};

const DIM: usize = 64;
const LR: f64 = 0.05;
const MOMENTUM: f64 = 0.9;

struct Options {
    steps: u64,
    leak_mb: usize,
    step_ms: u64,
    batch: u64,
    eval_every: u64,
    eval_ms: u64,
}

fn options() -> Result<Options, String> {
    let mut options = Options { steps: 200, leak_mb: 0, step_ms: 5, batch: 8, eval_every: 0, eval_ms: 0 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number: u64 = value.parse().map_err(|_| format!("{flag} {value}: not a non-negative integer"))?;
        match flag.as_str() {
            "--steps" => options.steps = number,
            "--leak-mb" => options.leak_mb = number as usize,
            "--step-ms" => options.step_ms = number,
            "--batch" => options.batch = number.max(1),
            "--eval-every" => options.eval_every = number,
            "--eval-ms" => options.eval_ms = number,
            _ => return Err(format!("unknown option {flag} (known: --steps --leak-mb --step-ms --batch \
                                     --eval-every --eval-ms)")),
        }
    }
    Ok(options)
}

/// The "model": linear weights fitted to a fixed target by SGD with momentum (the optimizer state).
struct Model {
    weights: Vec<f64>,
    velocity: Vec<f64>,
}

fn target(i: usize) -> f64 {
    ((i as f64) * 0.37).sin()
}

/// The data of step `step` is a pure function of the step, so a resumed run equals an uninterrupted one.
fn noise(step: u64, i: usize) -> f64 {
    let mut x = step.wrapping_mul(6364136223846793005).wrapping_add(i as u64 * 1442695040888963407);
    x ^= x >> 33;
    (x % 1000) as f64 / 1000.0 - 0.5
}

impl Model {
    fn new() -> Self {
        Model { weights: vec![0.0; DIM], velocity: vec![0.0; DIM] }
    }

    /// One optimizer step over `samples` noisy samples; the loss before the update.
    fn train_step(&mut self, step: u64, samples: u64) -> f64 {
        let mut loss = 0.0;
        for i in 0..DIM {
            let error = self.weights[i] - target(i) - 0.1 * noise(step, i) / (samples as f64).sqrt();
            loss += error * error / DIM as f64;
            self.velocity[i] = MOMENTUM * self.velocity[i] + error;
            self.weights[i] -= LR * self.velocity[i];
        }
        loss
    }

    fn validation_loss(&self) -> f64 {
        self.weights.iter().enumerate().map(|(i, w)| (w - target(i)).powi(2)).sum::<f64>() / DIM as f64
    }

    fn load(&mut self, dir: &Path) -> io::Result<()> {
        self.weights = read_floats(&dir.join("model.bin"))?;
        self.velocity = read_floats(&dir.join("optimizer.bin"))?;
        Ok(())
    }
}

impl TrainState for Model {
    /// With mlx-rs: save the model's parameters and the optimizer's state as safetensors into `dir`.
    fn save(&mut self, dir: &Path) -> io::Result<()> {
        write_floats(&dir.join("model.bin"), &self.weights)?;
        write_floats(&dir.join("optimizer.bin"), &self.velocity)
    }
}

fn write_floats(path: &Path, values: &[f64]) -> io::Result<()> {
    fs::write(path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

fn read_floats(path: &Path) -> io::Result<Vec<f64>> {
    let bytes = fs::read(path)?;
    if bytes.len() != DIM * 8 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: {} bytes", path.display(), bytes.len())));
    }
    Ok(bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Memory that is never given back, touched page by page so that it is resident.
fn leak(leaked: &mut Vec<Vec<u8>>, mib: usize) {
    if mib == 0 {
        return;
    }
    let mut block = vec![0u8; mib << 20];
    for page in block.chunks_mut(4096) {
        page[0] = 1;
    }
    leaked.push(block);
}

fn run(options: Options) -> Result<(), Box<dyn std::error::Error>> {
    let mut session = Session::from_env(options.steps, options.batch, 1)?;
    let mut model = Model::new();
    let resumed = session.resume(|dir| model.load(dir));
    let mut step = resumed.step;
    eprintln!("leaky: start at step {step}, batch {}×{}", resumed.batch, resumed.accum);
    let mut leaked = Vec::new();
    while step < options.steps {
        let started = std::time::Instant::now();
        sleep(Duration::from_millis(options.step_ms)); // the forward and backward pass
        let loss = model.train_step(step, session.batch() * session.accum());
        leak(&mut leaked, options.leak_mb);
        step += 1;
        let tokens = (session.batch() * session.accum() * DIM as u64) as f64;
        let throughput = tokens / started.elapsed().as_secs_f64();
        let mut stats = StepStats { tokens_per_second: Some(throughput), ..StepStats::default() };
        if options.eval_every > 0 && step % options.eval_every == 0 {
            let _busy = session.busy(); // heartbeats from the pulse thread while the validation runs
            sleep(Duration::from_millis(options.eval_ms));
            stats.val_loss = Some(model.validation_loss());
        }
        if let Next::Exit(code) = session.end_step_with(step, loss, stats, &mut model)? {
            std::process::exit(code);
        }
    }
    session.finish(step, &mut model)?;
    let (loss, checksum) = (model.validation_loss(), model.weights.iter().sum::<f64>());
    println!("leaky: finished at step {step}, loss {loss:.6}, checksum {checksum:.12}");
    Ok(())
}

fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(problem) => {
            eprintln!("leaky: {problem}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(options) {
        eprintln!("leaky: {error}");
        std::process::exit(1);
    }
}
