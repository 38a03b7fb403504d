//! Memory estimates for sampling requests and training steps, checked against the memory the
//! machine has available before anything is allocated: a request that cannot fit says what was
//! asked and what fits, instead of being killed by the kernel. The advice names the knobs as the
//! fields of [`crate::Request`] and the trainer's config call them (batch, batch size, scale, the
//! GIF), which the `ddpm` command's flags of the same names set.

use ddpm_unet::ModelCard;

use crate::{request_err, Result};

/// Live f32 activations of one image in an inference forward pass, per element of the
/// largest feature maps: calibrated on `small` at 28×28 (2,000 images in one forward pass
/// peaked at 2.4 GB RSS, about 7.4 such maps per image), rounded up.
const LIVE_MAPS: u64 = 8;

/// Live f32 maps per image of a training step (activations kept for the backward pass, their
/// gradients and the convolution scratch), per element of the largest feature maps: `small` at
/// batch 128 peaked at 956 MiB RSS (docs/performance.md), about 40 such maps per image.
const TRAIN_MAPS: u64 = 40;

/// The f32 elements of one image's feature maps at every level of the U-Net.
fn maps_per_image(card: &ModelCard) -> u64 {
    let (d, m) = (&card.data, &card.model);
    (0..m.channel_mults.len())
        .map(|l| {
            let side = |s: usize| (s >> l).max(1) as u64;
            m.level_channels(l) as u64 * side(d.height) * side(d.width)
        })
        .sum()
}

/// Bytes a training step at `batch` needs, roughly.
pub fn training_bytes(card: &ModelCard, batch: usize) -> u64 {
    (batch as u64).saturating_mul(maps_per_image(card) * 4 * TRAIN_MAPS)
}

/// Fails, naming what fits, when a training step at `batch` cannot fit in the memory this
/// machine has available.
pub fn check_training(card: &ModelCard, batch: usize) -> Result<()> {
    let need = training_bytes(card, batch);
    let Some((avail, limit)) = shortfall(need) else {
        return Ok(());
    };
    let per_image = training_bytes(card, 1).max(1);
    let advice = if per_image > avail {
        format!(
            "even one image per step needs {:.2} GiB: choose a smaller model or image size, or \
             free memory",
            gib(per_image)
        )
    } else {
        format!("use a batch size of {} or less", avail / per_image)
    };
    Err(request_err(format!(
        "batch size {batch}: a training step needs about {:.1} GiB, but only {:.1} GiB is \
         {limit}: {advice}",
        gib(need),
        gib(avail),
    )))
}

/// Bytes a sampling request needs, roughly: the noise and the samples of all `n` images, the
/// activations of one batch of `batch` (twice that when guided), and the pictures.
pub fn sampling_bytes(
    card: &ModelCard,
    n: usize,
    batch: usize,
    guided: bool,
    scale: usize,
    gif: bool,
) -> u64 {
    let d = &card.data;
    let pixels = (d.channels * d.height * d.width) as u64;
    let per_level = maps_per_image(card);
    let fwd = batch as u64 * if guided { 2 } else { 1 };
    let working = fwd.saturating_mul(per_level * 4 * LIVE_MAPS);
    let images = (n as u64).saturating_mul(pixels * 4 * 3);
    let s = scale.max(1) as u64;
    let side = |px: usize| (px as u64).saturating_mul(s).saturating_add(s);
    let picture = (n as u64).saturating_mul(
        side(d.height)
            .saturating_mul(side(d.width))
            .saturating_mul(3),
    );
    // A GIF keeps 41 frames of every sample, drawn at scale 2.
    let frames = if gif {
        (n as u64).saturating_mul(
            41 * (pixels * 4 + (d.height as u64 * 2 + 2) * (d.width as u64 * 2 + 2) * 3),
        )
    } else {
        0
    };
    working
        .saturating_add(images)
        .saturating_add(picture)
        .saturating_add(frames)
}

/// The memory this process can still allocate ([`ddpm_core::memory::available`]: the machine's,
/// the address-space limit's and the cgroup's, the least of them), when it is known and less
/// than `need` bytes.
fn shortfall(need: u64) -> Option<(u64, ddpm_core::memory::Limit)> {
    ddpm_core::memory::available().filter(|&(avail, _)| need > avail)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Fails with a message naming the request and what fits when [`sampling_bytes`] exceeds the
/// memory available (on the CPU; a GPU's own memory is not known here, so only host-side
/// buffers are counted there).
pub fn check_sampling(
    card: &ModelCard,
    n: usize,
    batch: usize,
    guided: bool,
    scale: usize,
    gif: bool,
    on_cpu: bool,
) -> Result<()> {
    let need = sampling_bytes(card, n, if on_cpu { batch } else { 0 }, guided, scale, gif);
    let Some((avail, limit)) = shortfall(need) else {
        return Ok(());
    };
    let working = if on_cpu {
        sampling_bytes(card, 0, batch, guided, 1, false)
    } else {
        0
    };
    let one = sampling_bytes(card, 1, 0, guided, scale, gif);
    let advice = if scale > 1 && one > avail.saturating_sub(working) {
        format!("a picture at scale {scale} alone does not fit: use a smaller scale")
    } else if working > avail / 2 {
        let per_image = sampling_bytes(card, 0, 1, guided, 1, false).max(1);
        format!(
            "use a smaller batch (about {} fit beside the samples)",
            (avail / 2 / per_image).max(1)
        )
    } else {
        let per_sample = sampling_bytes(card, 1, 0, guided, scale, gif).max(1);
        format!(
            "ask for fewer samples (about {} in all fit{})",
            (avail - working) / per_sample,
            if gif { "; or leave out the GIF" } else { "" }
        )
    };
    Err(request_err(format!(
        "this request needs about {:.1} GiB ({n} samples of {}×{}×{} in batches of {batch}{}{}), \
         but only {:.1} GiB is {limit}: {advice}",
        gib(need),
        card.data.channels,
        card.data.height,
        card.data.width,
        if scale > 1 {
            format!(", pictures at scale {scale}")
        } else {
            String::new()
        },
        if gif { ", a GIF" } else { "" },
        gib(avail),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddpm_unet::DataInfo;

    fn small() -> ModelCard {
        ModelCard {
            model: ddpm_unet::UNetConfig::small(),
            schedule: ddpm_schedule::ScheduleConfig::default(),
            data: DataInfo::mnist(),
            prediction: Default::default(),
            distilled: None,
        }
    }

    #[test]
    fn the_estimate_matches_the_measured_peak_and_grows_with_each_input() {
        let c = small();
        // Measured: 1,000 guided samples in one batch peaked at 2.4 GB RSS (docs/performance.md).
        let one_batch = sampling_bytes(&c, 1000, 1000, true, 1, false);
        assert!((2.0e9..3.5e9).contains(&(one_batch as f64)), "{one_batch}");
        let batched = sampling_bytes(&c, 1000, 128, true, 1, false);
        assert!(batched < one_batch / 4, "{batched}");
        assert!(sampling_bytes(&c, 1000, 128, true, 8, false) > batched);
        assert!(sampling_bytes(&c, 1000, 128, true, 1, true) > batched);
        assert!(sampling_bytes(&c, 1000, 128, false, 1, false) < batched);
        // Training: the measured peak of `small` at batch 128 (956 MiB).
        let train = training_bytes(&c, 128) as f64;
        assert!((0.6e9..1.3e9).contains(&train), "{train}");
        // A step that does not fit even at batch 1 says so, instead of "a batch size of 1".
        let mut huge = small();
        huge.data.height = 4096;
        huge.data.width = 4096;
        if let Err(e) = check_training(&huge, 1) {
            let e = e.to_string();
            assert!(
                e.contains("even one image") && !e.contains("of 1 or less"),
                "{e}"
            );
        }
        // Absurd requests saturate instead of wrapping around.
        assert_eq!(
            sampling_bytes(&c, usize::MAX, 128, true, 1, false),
            u64::MAX
        );
    }
}
