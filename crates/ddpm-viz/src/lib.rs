//! Pictures: sample grids (PNG), single samples at their native size, `.npz` sample files,
//! reverse-diffusion animations (GIF, light or dark), labelled rows, titled panels and line
//! plots (PNG). Every file is encoded in memory and written atomically
//! ([`ddpm_core::write_atomic`]), so an error (a full disk included) is returned, naming the
//! file, and an existing picture is never left torn.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::{Rgb, RgbImage};

/// Why a picture could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VizError {
    /// The images cannot be drawn as asked (channels, sizes).
    #[error("cannot draw: {0}")]
    Invalid(String),
    /// An output path cannot be used as given (a folder, or the wrong extension).
    #[error("{0}")]
    BadPath(String),
    /// A picture could not be encoded.
    #[error("cannot write picture {path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: image::ImageError,
    },
    /// Writing the file failed (a full disk lands here).
    #[error("cannot write or read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A `Result` with [`VizError`].
pub type Result<T> = std::result::Result<T, VizError>;

fn img_err(path: &Path) -> impl FnOnce(image::ImageError) -> VizError + '_ {
    move |source| VizError::Image {
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    ddpm_core::write_atomic(path, bytes).map_err(|source| VizError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Lays out `[N, C, H, W]` images in `[-1, 1]` as a grid of `ncols` columns, each pixel
/// repeated `scale` times, with a 1-pixel (× scale) grey gutter. C must be 1 or 3.
pub fn grid_image(images: &Tensor, ncols: usize, scale: usize) -> Result<RgbImage> {
    let (n, c, h, w) = images.dims4()?;
    if c != 1 && c != 3 {
        return Err(VizError::Invalid(format!(
            "cannot draw images with {c} channels"
        )));
    }
    let (ncols, scale) = (ncols.clamp(1, n.max(1)), scale.max(1));
    let (width, height) = grid_size(n, ncols, h, w, scale)?;
    let px = to_u8(images)?;
    let gutter = scale;
    let (cw, ch) = (w * scale + gutter, h * scale + gutter);
    let mut out = RgbImage::from_pixel(width, height, Rgb([96, 96, 96]));
    for i in 0..n {
        let (ox, oy) = (gutter + (i % ncols) * cw, gutter + (i / ncols) * ch);
        for y in 0..h * scale {
            for x in 0..w * scale {
                let (sy, sx) = (y / scale, x / scale);
                let at = |k: usize| px[((i * c + k) * h + sy) * w + sx];
                let p = if c == 1 {
                    [at(0); 3]
                } else {
                    [at(0), at(1), at(2)]
                };
                out.put_pixel((ox + x) as u32, (oy + y) as u32, Rgb(p));
            }
        }
    }
    Ok(out)
}

/// The side (pixels) past which a picture is refused: PNG encoders and viewers stop well
/// before PNG's own limit of 2³¹ − 1.
pub const MAX_PICTURE_SIDE: u64 = 1 << 16;

/// The (width, height) of the grid [`grid_image`] draws for `n` images of `h × w` in `ncols`
/// columns at `scale`, checked before anything is allocated: every product in checked
/// arithmetic, each side at most [`MAX_PICTURE_SIDE`], and the picture within the memory this
/// process can still allocate ([`ddpm_core::memory::check`]). The error names the scale and the
/// size it would give.
pub fn grid_size(n: usize, ncols: usize, h: usize, w: usize, scale: usize) -> Result<(u32, u32)> {
    let (ncols, scale) = (ncols.clamp(1, n.max(1)) as u64, scale.max(1) as u64);
    let nrows = (n as u64).div_ceil(ncols);
    let side = |cells: u64, px: usize| {
        (px as u64)
            .checked_mul(scale)
            .and_then(|v| v.checked_add(scale))
            .and_then(|cell| cell.checked_mul(cells))
            .and_then(|v| v.checked_add(scale))
    };
    let (width, height) = (side(ncols, w), side(nrows, h));
    let too_big = || {
        VizError::Invalid(format!(
            "{n} images of {h}×{w} at scale {scale} in {ncols} columns make a picture of {}×{} \
             pixels, beyond the {MAX_PICTURE_SIDE} pixels a side that pictures are drawn at: \
             use a smaller scale or fewer samples",
            width.map_or("more than 2⁶⁴".to_string(), |v| v.to_string()),
            height.map_or("more than 2⁶⁴".to_string(), |v| v.to_string()),
        ))
    };
    let (Some(width), Some(height)) = (width, height) else {
        return Err(too_big());
    };
    if width > MAX_PICTURE_SIDE || height > MAX_PICTURE_SIDE {
        return Err(too_big());
    }
    // The RGB picture and its encoded copy.
    ddpm_core::memory::check(
        width.saturating_mul(height).saturating_mul(3 * 2),
        &format!("a picture of {width}×{height} pixels"),
    )
    .map_err(|e| VizError::Invalid(format!("{e}: use a smaller scale or fewer samples")))?;
    Ok((width as u32, height as u32))
}

/// `[N, C, H, W]` images in `[-1, 1]` as bytes in `0..=255` ([`ddpm_core::to_u8`], the one
/// mapping every picture and sample file uses). Fails on any non-finite value.
pub fn to_u8(images: &Tensor) -> Result<Vec<u8>> {
    Ok(ddpm_core::to_u8(images)?)
}

/// Writes one `[C, H, W]` image in `[-1, 1]` at its native size, as a grayscale PNG (mode L)
/// for one channel or RGB for three: the form MNIST digits have, and FID tools and classifiers
/// read. Atomic, like [`write_png`].
pub fn write_sample_png(image: &Tensor, path: &Path) -> Result<()> {
    check_extension(path, "png")?;
    let (c, h, w) = image.dims3()?;
    let px = to_u8(image)?;
    let (w32, h32) = (w as u32, h as u32);
    let mut bytes = Vec::new();
    let mut cur = std::io::Cursor::new(&mut bytes);
    match c {
        1 => image::GrayImage::from_raw(w32, h32, px)
            .ok_or_else(|| VizError::Invalid("image buffer size".into()))?
            .write_to(&mut cur, image::ImageFormat::Png),
        3 => {
            // [C, H, W] → interleaved RGB.
            let plane = h * w;
            let rgb: Vec<u8> = (0..plane)
                .flat_map(|i| [px[i], px[plane + i], px[2 * plane + i]])
                .collect();
            RgbImage::from_raw(w32, h32, rgb)
                .ok_or_else(|| VizError::Invalid("image buffer size".into()))?
                .write_to(&mut cur, image::ImageFormat::Png)
        }
        _ => {
            return Err(VizError::Invalid(format!(
                "cannot write images with {c} channels"
            )))
        }
    }
    .map_err(img_err(path))?;
    write_atomic(path, &bytes)
}

/// Writes `[N, C, H, W]` images in `[-1, 1]` and their labels as one `.npz` file, the form the
/// standard diffusion evaluators read: `arr_0`, uint8 `[N, H, W, C]` (channels last), and, when
/// given, `arr_1`, the int64 labels `[N]`. An uncompressed zip of `.npy` files (format 1.0),
/// written atomically.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dir = std::env::temp_dir().join(format!("npz-doc-{}", std::process::id()));
/// let x = Tensor::zeros((2, 1, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let path = dir.join("s.npz");
/// ddpm_viz::write_npz(&x, Some(&[3, 7]), &path)?;
/// let bytes = std::fs::read(&path).unwrap();
/// assert_eq!(&bytes[..4], b"PK\x03\x04");
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), ddpm_viz::VizError>(())
/// ```
pub fn write_npz(images: &Tensor, labels: Option<&[u32]>, path: &Path) -> Result<()> {
    check_extension(path, "npz")?;
    let (n, c, h, w) = images.dims4()?;
    if let Some(l) = labels {
        if l.len() != n {
            return Err(VizError::Invalid(format!(
                "{} labels for {n} images",
                l.len()
            )));
        }
    }
    let px = to_u8(&images.permute((0, 2, 3, 1))?.contiguous()?)?;
    let mut entries = vec![("arr_0.npy", npy("|u1", &[n, h, w, c], &px))];
    if let Some(l) = labels {
        let data: Vec<u8> = l.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect();
        entries.push(("arr_1.npy", npy("<i8", &[n], &data)));
    }
    let zip = stored_zip(&entries).ok_or_else(|| {
        VizError::Invalid(format!(
            "{}: {n} samples make an .npz beyond 4 GiB (zip64 is not written); ask for fewer",
            path.display()
        ))
    })?;
    write_atomic(path, &zip)
}

/// An `.npy` file (format 1.0) of C-ordered `data` with numpy type `descr` and `shape`.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64,
    // ending in a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.div_ceil(64) * 64 - unpadded));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A zip archive of `entries`, stored (no compression); `None` beyond zip's 32-bit sizes.
fn stored_zip(entries: &[(&str, Vec<u8>)]) -> Option<Vec<u8>> {
    let u32_of = |v: usize| u32::try_from(v).ok();
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let (crc, size, offset) = (crc.sum(), u32_of(data.len())?, u32_of(out.len())?);
        let name_len = u16::try_from(name.len()).ok()?;
        // Local file header: version 2.0, no flags, stored, 1980-01-01 00:00.
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
        out.extend(crc.to_le_bytes());
        out.extend(size.to_le_bytes());
        out.extend(size.to_le_bytes());
        out.extend(name_len.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(data);
        // Its central directory record.
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
        central.extend(crc.to_le_bytes());
        central.extend(size.to_le_bytes());
        central.extend(size.to_le_bytes());
        central.extend(name_len.to_le_bytes());
        central.extend([0u8; 12]); // extra, comment, disk, internal and external attributes
        central.extend(offset.to_le_bytes());
        central.extend(name.as_bytes());
    }
    let (cd_offset, cd_size) = (u32_of(out.len())?, u32_of(central.len())?);
    let count = u16::try_from(entries.len()).ok()?;
    out.extend(central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]); // this disk, the central directory's disk
    out.extend(count.to_le_bytes());
    out.extend(count.to_le_bytes());
    out.extend(cd_size.to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    Some(out)
}

/// Saves a grid of images (see [`grid_image`]) as PNG.
pub fn save_grid(images: &Tensor, ncols: usize, scale: usize, path: &Path) -> Result<()> {
    let img = grid_image(images, ncols, scale)?;
    write_png(&img, path)
}

/// Encodes `img` as PNG in memory and writes it atomically (see [`ddpm_core::write_atomic`]):
/// every error, a full disk included, is returned, naming the file, and an existing picture at
/// `path` is left intact. `path` must end in `.png`.
pub fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    check_extension(path, "png")?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(img_err(path))?;
    write_atomic(path, &bytes)
}

fn check_extension(path: &Path, ext: &str) -> Result<()> {
    if path.is_dir() {
        return Err(VizError::BadPath(format!(
            "{} is a folder: give a file path ending in .{ext}",
            path.display()
        )));
    }
    let ok = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext));
    if !ok {
        return Err(VizError::BadPath(format!(
            "{}: this picture is written as {}, so its name must end in .{ext}",
            path.display(),
            ext.to_uppercase()
        )));
    }
    Ok(())
}

/// Places `panels` side by side on white, each under its title (drawn with the built-in font),
/// and saves the PNG: e.g. one sample grid per guidance weight.
///
/// ```
/// use image::{Rgb, RgbImage};
/// let dir = std::env::temp_dir().join(format!("viz-doc-{}", std::process::id()));
/// let a = RgbImage::from_pixel(20, 10, Rgb([0, 0, 0]));
/// let path = dir.join("p.png");
/// ddpm_viz::save_panels(&[("W = 0".into(), a.clone()), ("W = 3".into(), a)], &path)?;
/// let img = image::open(&path).unwrap();
/// assert!(img.width() > 40 && img.height() > 10);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), ddpm_viz::VizError>(())
/// ```
pub fn save_panels(panels: &[(String, RgbImage)], path: &Path) -> Result<()> {
    let (gap, title_h, s) = (12u32, 22u32, 3i64);
    let width = panels.iter().map(|(_, p)| p.width() + gap).sum::<u32>() + gap;
    let height = panels.iter().map(|(_, p)| p.height()).max().unwrap_or(0) + title_h + gap;
    let mut img = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([255, 255, 255]));
    let mut x = gap;
    for (title, p) in panels {
        draw_text(&mut img, x as i64, 4, title, s, Rgb([20, 20, 20]));
        image::imageops::replace(&mut img, p, x as i64, title_h as i64);
        x += p.width() + gap;
    }
    write_png(&img, path)
}

/// Stacks `rows` vertically on white, each with its label drawn to its left (the built-in
/// font), e.g. one row of real digits per class.
pub fn labelled_rows(rows: &[(String, RgbImage)]) -> RgbImage {
    let (s, gap) = (3i64, 8u32);
    let label_w = rows
        .iter()
        .map(|(l, _)| l.chars().count() as u32 * 4 * s as u32)
        .max()
        .unwrap_or(0)
        + 2 * gap;
    let width = label_w + rows.iter().map(|(_, r)| r.width()).max().unwrap_or(0) + gap;
    let height = rows.iter().map(|(_, r)| r.height()).sum::<u32>() + gap;
    let mut img = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([255, 255, 255]));
    let mut y = gap / 2;
    for (label, row) in rows {
        let ty = y as i64 + (row.height() as i64 - 5 * s) / 2;
        draw_text(&mut img, gap as i64, ty, label, s, Rgb([20, 20, 20]));
        image::imageops::replace(&mut img, row, label_w as i64, y as i64);
        y += row.height();
    }
    img
}

/// The colours of a picture: MNIST's own light digits on a dark ground, or inverted for a
/// light page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Theme {
    /// Light digits on a dark ground (the data as it is).
    Dark,
    /// Dark digits on a light ground (every pixel inverted).
    Light,
}

/// `img` in `theme`: unchanged for [`Theme::Dark`], inverted for [`Theme::Light`].
pub fn themed(img: &RgbImage, theme: Theme) -> RgbImage {
    let mut out = img.clone();
    if theme == Theme::Light {
        image::imageops::invert(&mut out);
    }
    out
}

/// Saves frames as a looping GIF, `delay_ms` per frame, holding the last frame 2 s. Encoded in
/// memory, then written atomically (see [`write_png`]); `path` must end in `.gif`.
pub fn save_gif(frames: &[RgbImage], delay_ms: u32, path: &Path) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    use image::{Delay, Frame};
    check_extension(path, "gif")?;
    let mut bytes = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut bytes, 10);
        enc.set_repeat(Repeat::Infinite).map_err(img_err(path))?;
        for (i, f) in frames.iter().enumerate() {
            let ms = if i + 1 == frames.len() {
                2000
            } else {
                delay_ms
            };
            let rgba = image::DynamicImage::ImageRgb8(f.clone()).to_rgba8();
            enc.encode_frame(Frame::from_parts(
                rgba,
                0,
                0,
                Delay::from_numer_denom_ms(ms, 1),
            ))
            .map_err(img_err(path))?;
        }
    }
    write_atomic(path, &bytes)
}

/// 3×5 pixel glyphs for plot labels (digits, a few signs, upper-case letters).
fn glyph(c: char) -> [u8; 5] {
    let rows: [&str; 5] = match c.to_ascii_uppercase() {
        '0' => ["111", "101", "101", "101", "111"],
        '1' => ["010", "110", "010", "010", "111"],
        '2' => ["111", "001", "111", "100", "111"],
        '3' => ["111", "001", "111", "001", "111"],
        '4' => ["101", "101", "111", "001", "001"],
        '5' => ["111", "100", "111", "001", "111"],
        '6' => ["111", "100", "111", "101", "111"],
        '7' => ["111", "001", "001", "010", "010"],
        '8' => ["111", "101", "111", "101", "111"],
        '9' => ["111", "101", "111", "001", "111"],
        '.' => ["000", "000", "000", "000", "010"],
        '-' => ["000", "000", "111", "000", "000"],
        '=' => ["000", "111", "000", "111", "000"],
        '+' => ["000", "010", "111", "010", "000"],
        '(' => ["001", "010", "010", "010", "001"],
        ')' => ["100", "010", "010", "010", "100"],
        'A' => ["010", "101", "111", "101", "101"],
        'B' => ["110", "101", "110", "101", "110"],
        'C' => ["111", "100", "100", "100", "111"],
        'D' => ["110", "101", "101", "101", "110"],
        'E' => ["111", "100", "110", "100", "111"],
        'F' => ["111", "100", "110", "100", "100"],
        'G' => ["111", "100", "101", "101", "111"],
        'H' => ["101", "101", "111", "101", "101"],
        'I' => ["111", "010", "010", "010", "111"],
        'K' => ["101", "101", "110", "101", "101"],
        'L' => ["100", "100", "100", "100", "111"],
        'M' => ["101", "111", "111", "101", "101"],
        'N' => ["110", "101", "101", "101", "101"],
        'O' => ["111", "101", "101", "101", "111"],
        'P' => ["111", "101", "111", "100", "100"],
        'R' => ["110", "101", "110", "101", "101"],
        'S' => ["111", "100", "111", "001", "111"],
        'T' => ["111", "010", "010", "010", "010"],
        'U' => ["101", "101", "101", "101", "111"],
        'V' => ["101", "101", "101", "101", "010"],
        'W' => ["101", "101", "111", "111", "101"],
        'X' => ["101", "101", "010", "101", "101"],
        'Y' => ["101", "101", "010", "010", "010"],
        'J' => ["001", "001", "001", "101", "111"],
        'Q' => ["111", "101", "101", "111", "001"],
        'Z' => ["111", "001", "010", "100", "111"],
        '/' => ["001", "001", "010", "100", "100"],
        '_' => ["000", "000", "000", "000", "111"],
        ':' => ["000", "010", "000", "010", "000"],
        ',' => ["000", "000", "000", "010", "100"],
        _ => ["000", "000", "000", "000", "000"],
    };
    rows.map(|r| r.bytes().fold(0u8, |acc, b| (acc << 1) | (b == b'1') as u8))
}

/// Draws `text` with its top-left corner at (x, y), each font pixel `s`×`s`.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, s: i64, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (0b100 >> col) != 0 {
                    let (px, py) = (x + (i as i64 * 4 + col) * s, y + row as i64 * s);
                    fill_rect(img, px, py, s, s, color);
                }
            }
        }
    }
}

fn fill_rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, color: Rgb<u8>) {
    for yy in y.max(0)..(y + h).min(img.height() as i64) {
        for xx in x.max(0)..(x + w).min(img.width() as i64) {
            img.put_pixel(xx as u32, yy as u32, color);
        }
    }
}

fn draw_line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let f = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * f, y0 + (y1 - y0) * f);
        fill_rect(img, x.round() as i64 - 1, y.round() as i64 - 1, 2, 2, color);
    }
}

/// A named series of (x, y) points for [`plot_lines`].
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Line colour.
    pub color: [u8; 3],
    /// Points.
    pub points: Vec<(f64, f64)>,
}

/// Plots line series on one set of axes (log-scale y when `log_y` and all y > 0) and saves a PNG.
pub fn plot_lines(
    series: &[Series],
    title: &str,
    x_label: &str,
    log_y: bool,
    path: &Path,
) -> Result<()> {
    let (w, h) = (900i64, 520i64);
    let (left, right, top, bottom) = (90i64, 30i64, 50i64, 60i64);
    let mut img = RgbImage::from_pixel(w as u32, h as u32, Rgb([255, 255, 255]));
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let log_y = log_y && pts.iter().all(|p| p.1 > 0.0);
    let fy = |y: f64| if log_y { y.log10() } else { y };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(fy(y)), y1.max(fy(y)));
    }
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = (y1 - y0) * 0.05;
    (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = ((w - left - right) as f64, (h - top - bottom) as f64);
    let to_px = |x: f64, y: f64| {
        (
            left as f64 + (x - x0) / (x1 - x0) * pw,
            top as f64 + (1.0 - (fy(y) - y0) / (y1 - y0)) * ph,
        )
    };
    let (grey, black) = (Rgb([225, 225, 225]), Rgb([20, 20, 20]));
    let y_span = if log_y {
        10f64.powf(y1) - 10f64.powf(y0)
    } else {
        y1 - y0
    };
    for k in 0..=5 {
        let f = k as f64 / 5.0;
        let (gx, gy) = (left as f64 + f * pw, top as f64 + (1.0 - f) * ph);
        draw_line(&mut img, (gx, top as f64), (gx, (h - bottom) as f64), grey);
        draw_line(&mut img, (left as f64, gy), ((w - right) as f64, gy), grey);
        let xv = x0 + f * (x1 - x0);
        let yv = y0 + f * (y1 - y0);
        let yv = if log_y { 10f64.powf(yv) } else { yv };
        draw_text(
            &mut img,
            gx as i64 - 12,
            h - bottom + 8,
            &format_num(xv, x1 - x0),
            2,
            black,
        );
        draw_text(
            &mut img,
            6,
            gy as i64 - 5,
            &format_num(yv, y_span),
            2,
            black,
        );
    }
    draw_line(
        &mut img,
        (left as f64, top as f64),
        (left as f64, (h - bottom) as f64),
        black,
    );
    draw_line(
        &mut img,
        (left as f64, (h - bottom) as f64),
        ((w - right) as f64, (h - bottom) as f64),
        black,
    );
    draw_text(&mut img, left, 12, title, 3, black);
    draw_text(&mut img, w / 2 - 20, h - 22, x_label, 2, black);
    for (i, s) in series.iter().enumerate() {
        let color = Rgb(s.color);
        let valid: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_y || p.1 > 0.0))
            .collect();
        for win in valid.windows(2) {
            draw_line(
                &mut img,
                to_px(win[0].0, win[0].1),
                to_px(win[1].0, win[1].1),
                color,
            );
        }
        if valid.len() == 1 {
            let (px, py) = to_px(valid[0].0, valid[0].1);
            fill_rect(&mut img, px as i64 - 3, py as i64 - 3, 6, 6, color);
        }
        let ly = top + 10 + 18 * i as i64;
        fill_rect(&mut img, w - right - 190, ly, 20, 10, color);
        draw_text(&mut img, w - right - 160, ly, &s.label, 2, black);
    }
    write_png(&img, path)
}

/// A tick label for `v` on an axis spanning `span`: enough decimals to tell ticks apart.
fn format_num(v: f64, span: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-4..1e6).contains(&a) {
        return format!("{v:.2e}").replace('e', "E");
    }
    let step = (span / 5.0).abs().max(1e-12);
    let decimals = (-step.log10()).ceil().clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// Which colours of an animation to write: one theme, or both as `NAME-light.gif` and
/// `NAME-dark.gif` (e.g. for a README's `<picture>` with `prefers-color-scheme`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Themes {
    /// Light digits on black.
    #[default]
    Dark,
    /// Dark digits on white.
    Light,
    /// Both, as NAME-light.gif and NAME-dark.gif.
    Both,
}

impl Themes {
    /// The files `path` with these themes stands for, each with its theme.
    pub fn outputs(self, path: &Path) -> Vec<(PathBuf, Theme)> {
        match self {
            Themes::Dark => vec![(path.to_path_buf(), Theme::Dark)],
            Themes::Light => vec![(path.to_path_buf(), Theme::Light)],
            Themes::Both => {
                let stem = path
                    .file_stem()
                    .map_or("reverse".into(), |s| s.to_string_lossy().into_owned());
                let named = |t: &str| path.with_file_name(format!("{stem}-{t}.gif"));
                vec![(named("light"), Theme::Light), (named("dark"), Theme::Dark)]
            }
        }
    }
}

/// Writes the animation `frames` (`delay_ms` apart) once per theme of `themes`
/// ([`Themes::outputs`]); returns the files written.
pub fn save_gif_themed(
    frames: &[RgbImage],
    delay_ms: u32,
    path: &Path,
    themes: Themes,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (p, theme) in themes.outputs(path) {
        let themed_frames: Vec<RgbImage> = frames.iter().map(|f| themed(f, theme)).collect();
        save_gif(&themed_frames, delay_ms, &p)?;
        written.push(p);
    }
    Ok(written)
}

/// Writes each of `images` (`[N, C, H, W]` in [−1, 1]) into `dir` at its native size
/// ([`write_sample_png`]), named `00000_class-NAME.png` with `labels` and their `names`, or
/// `00000.png` without labels; returns how many were written.
pub fn write_each(
    images: &Tensor,
    labels: Option<&[u32]>,
    names: &[String],
    dir: &Path,
) -> Result<usize> {
    let n = images.dim(0)?;
    if let Ok(m) = std::fs::metadata(dir) {
        if !m.is_dir() {
            return Err(VizError::BadPath(format!(
                "{} is a file, not a folder: give a folder for the PNGs (it is created if \
                 missing)",
                dir.display()
            )));
        }
    }
    for i in 0..n {
        let name = match labels.and_then(|l| l.get(i)) {
            Some(&l) => {
                let class = names.get(l as usize).map_or("unnamed", |s| s.as_str());
                // Names come from model files, which are untrusted: a name that could lead
                // out of `dir` (or drive a terminal) is refused, never written.
                ddpm_core::files::check_name(class).map_err(|e| {
                    VizError::BadPath(format!(
                        "class name {e}: refusing to use it in a file name in {}",
                        dir.display()
                    ))
                })?;
                format!("{i:05}_class-{class}.png")
            }
            None => format!("{i:05}.png"),
        };
        let path = dir.join(&name);
        write_sample_png(&images.get(i)?, &path)?;
    }
    Ok(n)
}
