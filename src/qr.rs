//! QR codes of pairing URIs: SVG and PNG for the admin API and UI, and coloured text
//! for a terminal.
//!
//! Encoding is the `qrcode` crate's (error-correction level M, a 4-module quiet zone).
//! The terminal rendering draws two rows per line with half blocks in explicit black on
//! white, so it scans the same on a dark and on a light terminal theme.

use crate::error_kind::{Classify, ErrorKind};
use qrcode::{Color, EcLevel, QrCode};

/// Quiet zone around the code, in modules (the standard asks for 4).
const QUIET: usize = 4;
/// PNG pixels per module.
const PNG_SCALE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub(crate) enum QrError {
    #[error("the text does not fit in a QR code: {0}")]
    TooLong(String),
    #[error("PNG encoding failed: {0}")]
    Png(String),
}

impl Classify for QrError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::TooLong(_) | Self::Png(_) => ErrorKind::Internal,
        }
    }
}

fn encode(text: &str) -> Result<QrCode, QrError> {
    QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .map_err(|e| QrError::TooLong(e.to_string()))
}

/// Dark/light modules including the quiet zone, row by row.
fn modules(code: &QrCode) -> (usize, Vec<bool>) {
    let width = code.width();
    let colors = code.to_colors();
    let size = width + 2 * QUIET;
    let mut out = vec![false; size * size];
    for y in 0..width {
        for x in 0..width {
            out[(y + QUIET) * size + x + QUIET] = colors[y * width + x] == Color::Dark;
        }
    }
    (size, out)
}

/// An SVG document of the code.
pub(crate) fn svg(text: &str) -> Result<String, QrError> {
    let code = encode(text)?;
    Ok(code
        .render::<qrcode::render::svg::Color<'_>>()
        .quiet_zone(true)
        .min_dimensions(256, 256)
        .dark_color(qrcode::render::svg::Color("#000000"))
        .light_color(qrcode::render::svg::Color("#ffffff"))
        .build())
}

/// A PNG image of the code (8-bit greyscale, 8 pixels per module).
pub(crate) fn png(text: &str) -> Result<Vec<u8>, QrError> {
    let code = encode(text)?;
    let (size, dark) = modules(&code);
    let pixels = size * PNG_SCALE;
    let mut image = vec![0xffu8; pixels * pixels];
    for (i, _) in dark.iter().enumerate().filter(|(_, d)| **d) {
        let (mx, my) = (i % size, i / size);
        for y in my * PNG_SCALE..(my + 1) * PNG_SCALE {
            image[y * pixels + mx * PNG_SCALE..y * pixels + (mx + 1) * PNG_SCALE].fill(0);
        }
    }
    let side = u32::try_from(pixels).map_err(|e| QrError::Png(e.to_string()))?;
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, side, side);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| QrError::Png(e.to_string()))?;
        writer
            .write_image_data(&image)
            .map_err(|e| QrError::Png(e.to_string()))?;
        writer.finish().map_err(|e| QrError::Png(e.to_string()))?;
    }
    Ok(out)
}

/// The code as terminal text: each line holds two module rows drawn with `▀`, `▄`, `█`
/// and spaces in black on a white background (ANSI colours), whatever the theme.
pub(crate) fn terminal(text: &str) -> Result<String, QrError> {
    let code = encode(text)?;
    let (size, dark) = modules(&code);
    let at = |x: usize, y: usize| y < size && dark[y * size + x];
    let mut out = String::new();
    for y in (0..size).step_by(2) {
        out.push_str("\x1b[30;47m");
        for x in 0..size {
            out.push(match (at(x, y), at(x, y + 1)) {
                (true, true) => '█',
                (true, false) => '▀',
                (false, true) => '▄',
                (false, false) => ' ',
            });
        }
        out.push_str("\x1b[0m\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const URI: &str = "gatehouse://pair?v=1&server=https%3A%2F%2F127.0.0.1%3A8443\
                       &session=ps_00112233445566778899aabbccddeeff\
                       &secret=gsEMUca-q6hysekF3h9mKRlBSzeZ9QSpVfd0KD5kLI0&exp=1795427432\
                       &pin=sha256%2FhocG677ndXODN8hfFRQh7DrVnUdSbLUdAe17JLywis0%3D";

    #[test]
    fn every_format_renders_a_pairing_uri() {
        let svg = svg(URI).unwrap();
        assert!(svg.starts_with("<?xml") && svg.contains("<svg") && svg.contains("#000000"));
        let png = png(URI).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let text = terminal(URI).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let code = encode(URI).unwrap();
        assert_eq!(lines.len(), (code.width() + 2 * QUIET).div_ceil(2));
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with("\x1b[30;47m") && l.ends_with("\x1b[0m"))
        );
    }

    #[test]
    fn text_too_long_for_a_qr_code_is_an_error() {
        assert!(matches!(svg(&"x".repeat(5000)), Err(QrError::TooLong(_))));
    }
}
