use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use crate::error::{DataError, Result};
use crate::ImageDataset;

/// File extensions (lower-case) read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

fn list_dir(path: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
                hint: "give an existing folder laid out as ROOT/<class>/*.png".into(),
            }
        } else {
            io(e)
        }
    })? {
        entries.push(entry.map_err(io)?.path());
    }
    entries.sort();
    Ok(entries)
}

/// Decodes one image file: a regular file only (a FIFO or device named `x.png` is refused
/// before it is opened), with the image crate's default decoding limits against bombs.
fn read_image(file: &Path) -> Result<image::DynamicImage> {
    let (f, _) = ddpm_core::files::open_regular(file).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => DataError::Corrupt {
            path: file.to_path_buf(),
            reason: e.to_string(),
        },
        _ => DataError::Io {
            path: file.to_path_buf(),
            source: e,
        },
    })?;
    let unreadable = |source| DataError::UnreadableImage {
        path: file.to_path_buf(),
        source,
    };
    let mut reader = image::ImageReader::new(std::io::BufReader::new(f));
    reader = reader
        .with_guessed_format()
        .map_err(|e| unreadable(image::ImageError::IoError(e)))?;
    if reader.format().is_none() {
        if let Ok(format) = image::ImageFormat::from_path(file) {
            reader.set_format(format);
        }
    }
    reader.decode().map_err(unreadable)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// How many channels an image folder is loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Channels {
    /// Three (RGB) when any pixel of any image has colour (R, G, B not all equal), else one.
    #[default]
    Auto,
    /// One (grayscale, ITU-R BT.709 luma), whatever the images are.
    Gray,
    /// Three (RGB), whatever the images are (grayscale images repeat their one channel).
    Rgb,
}

impl Channels {
    /// The `folder:` prefix of [`crate::DatasetKind`]'s spelling: `folder` (auto),
    /// `folder-gray`, `folder-rgb`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Auto => "folder",
            Self::Gray => "folder-gray",
            Self::Rgb => "folder-rgb",
        }
    }
}

/// Loads `root/<class>/*.png|jpg|jpeg` resized to `height × width`, with three channels when
/// any image has colour and one otherwise ([`Channels::Auto`]; [`load_image_folder_as`]
/// chooses).
///
/// Classes are the sub-folder names in sorted order (label 0 is the first); files in
/// a class are read in sorted order. An empty class folder, a root with no class
/// folders and an image that cannot be decoded are errors naming the path.
pub fn load_image_folder(root: &Path, height: u32, width: u32) -> Result<ImageDataset> {
    load_image_folder_as(root, height, width, Channels::Auto)
}

/// [`load_image_folder`] with the channels chosen: one, three, or as the images have them.
pub fn load_image_folder_as(
    root: &Path,
    height: u32,
    width: u32,
    channels: Channels,
) -> Result<ImageDataset> {
    let class_dirs: Vec<PathBuf> = list_dir(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        return Err(DataError::NoClasses {
            path: root.to_path_buf(),
        });
    }
    let mut class_names = Vec::new();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut any_color = false;
    for (label, dir) in class_dirs.iter().enumerate() {
        let files: Vec<PathBuf> = list_dir(dir)?.into_iter().filter(|p| is_image(p)).collect();
        if files.is_empty() {
            return Err(DataError::EmptyClassFolder { path: dir.clone() });
        }
        for file in files {
            let img = read_image(&file)?;
            // Colour is in the pixels, not the file format: an RGB file of gray pixels (a
            // scan saved as RGB) stays one channel.
            any_color |= img.color().has_color()
                && img.to_rgb8().pixels().any(|p| p[0] != p[1] || p[1] != p[2]);
            // Resized as decoded (8-bit RGB or luma), converted once the channels are known.
            let img = if (img.width(), img.height()) == (width, height) {
                img
            } else {
                img.resize_exact(width, height, FilterType::Triangle)
            };
            images.push(img);
            labels.push(label as u32);
        }
        class_names.push(
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    let rgb = match channels {
        Channels::Auto => any_color,
        Channels::Gray => false,
        Channels::Rgb => true,
    };
    let plane = height as usize * width as usize;
    let c = if rgb { 3 } else { 1 };
    let mut pixels = Vec::with_capacity(images.len() * c * plane);
    for img in images {
        if rgb {
            // HWC (interleaved) → CHW (planes), the layout of every tensor here.
            let raw = img.to_rgb8().into_raw();
            for ch in 0..3 {
                pixels.extend(raw.iter().skip(ch).step_by(3));
            }
        } else {
            pixels.extend_from_slice(img.to_luma8().as_raw());
        }
    }
    tracing::info!(root = %root.display(), classes = class_names.len(), images = labels.len(), channels = c, "loaded image folder");
    ImageDataset::new(
        pixels,
        labels,
        (c, height as usize, width as usize),
        class_names,
    )
}
