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

/// Loads `root/<class>/*.png|jpg|jpeg` as grayscale images resized to `height × width`.
///
/// Classes are the sub-folder names in sorted order (label 0 is the first); files in
/// a class are read in sorted order. An empty class folder, a root with no class
/// folders and an image that cannot be decoded are errors naming the path.
pub fn load_image_folder(root: &Path, height: u32, width: u32) -> Result<ImageDataset> {
    let class_dirs: Vec<PathBuf> = list_dir(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        return Err(DataError::NoClasses {
            path: root.to_path_buf(),
        });
    }
    let mut class_names = Vec::new();
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (label, dir) in class_dirs.iter().enumerate() {
        let files: Vec<PathBuf> = list_dir(dir)?.into_iter().filter(|p| is_image(p)).collect();
        if files.is_empty() {
            return Err(DataError::EmptyClassFolder { path: dir.clone() });
        }
        for file in files {
            let img = read_image(&file)?.to_luma8();
            let img = if img.dimensions() == (width, height) {
                img
            } else {
                image::imageops::resize(&img, width, height, FilterType::Triangle)
            };
            pixels.extend_from_slice(img.as_raw());
            labels.push(label as u32);
        }
        class_names.push(
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    tracing::info!(root = %root.display(), classes = class_names.len(), images = labels.len(), "loaded image folder");
    ImageDataset::new(
        pixels,
        labels,
        (1, height as usize, width as usize),
        class_names,
    )
}
