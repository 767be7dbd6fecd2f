//! productpage's HTML.
//!
//! The strings tests and users look for (`Reviews served by: reviews-vN`, `stars: black`,
//! `stars: red`, and the error messages) are each written on a line of their own, with no
//! markup inside them.

use std::fmt::Write as _;

use serde_json::Value;

use crate::apps::RATINGS_UNAVAILABLE;
use crate::util::html_escape;

/// The book's title.
pub(crate) const TITLE: &str = "The Comedy of Errors";

/// The book's summary, as HTML.
pub(crate) const DESCRIPTION_HTML: &str = "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of his most farcical comedies, with a major part of the humour coming from slapstick and mistaken identity, in addition to puns and word play.";

const DETAILS_ERROR: &str = "Error fetching product details";
const REVIEWS_ERROR: &str = "Sorry, product reviews are currently unavailable";

const STYLE: &str = "body{font-family:sans-serif;margin:0;color:#222}\
nav{background:#263238;color:#fff;padding:.6em 1em;display:flex;justify-content:space-between;align-items:center}\
nav a{color:#fff;text-decoration:none;font-weight:bold}\
main{max-width:60em;margin:auto;padding:1em}\
.columns{display:flex;gap:2em;flex-wrap:wrap}\
.columns section{flex:1;min-width:18em}\
dt{font-weight:bold}\
blockquote{border-left:4px solid #ccc;margin:1em 0;padding:.2em 1em}\
.error{color:#b71c1c}\
.served-by{color:#666;font-size:.9em}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
}

/// `GET /`: a small index linking the product page.
pub(crate) fn index() -> String {
    page(
        "Simple Bookstore App",
        "<nav>\n<a href=\"/\">BookInfo Sample</a>\n</nav>\n<main>\n<h1>Hello! This is a simple bookstore application.</h1>\n\
         <p>It consists of four services written in Rust: productpage, details, reviews (v1, v2, v3) and ratings.</p>\n\
         <p><a href=\"/productpage\">Open the product page</a> (as a test user: <a href=\"/productpage?u=jason\">jason</a>)</p>\n\
         <p><a href=\"/api/v1/products\">Product list (JSON)</a></p>\n</main>\n",
    )
}

/// `GET /productpage`, from the details and reviews responses (`None` when the call failed).
pub(crate) fn product_page(user: Option<&str>, details: Option<&Value>, reviews: Option<&Value>) -> String {
    let mut body = String::new();
    body.push_str("<nav>\n<a href=\"/\">BookInfo Sample</a>\n<div class=\"user\">\n");
    match user {
        Some(user) => {
            let _ = write!(body, "Signed in as {}\n<a href=\"/logout\">Sign out</a>\n", html_escape(user));
        }
        None => body.push_str(
            "<form method=\"post\" action=\"/login\">\n\
             <input name=\"username\" placeholder=\"user name\" aria-label=\"user name\">\n\
             <button type=\"submit\">Sign in</button>\n</form>\n",
        ),
    }
    body.push_str("</div>\n</nav>\n<main>\n");
    let _ = write!(body, "<h1>{}</h1>\n<p>\n{DESCRIPTION_HTML}\n</p>\n<div class=\"columns\">\n", html_escape(TITLE));

    body.push_str("<section class=\"details\">\n<h2>Book Details</h2>\n");
    match details {
        Some(details) => render_details(&mut body, details),
        None => {
            let _ = write!(body, "<p class=\"error\">\n{DETAILS_ERROR}\n</p>\n");
        }
    }
    body.push_str("</section>\n");

    body.push_str("<section class=\"reviews\">\n<h2>Book Reviews</h2>\n");
    match reviews {
        Some(reviews) => render_reviews(&mut body, reviews),
        None => {
            let _ = write!(body, "<p class=\"error\">\n{REVIEWS_ERROR}\n</p>\n");
        }
    }
    body.push_str("</section>\n</div>\n</main>\n");
    page("Simple Bookstore App", &body)
}

/// A JSON value as display text (strings without quotes).
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn render_details(body: &mut String, details: &Value) {
    body.push_str("<dl>\n");
    for (label, key) in [
        ("Author", "author"),
        ("Year", "year"),
        ("Type", "type"),
        ("Pages", "pages"),
        ("Publisher", "publisher"),
        ("Language", "language"),
        ("ISBN-10", "ISBN-10"),
        ("ISBN-13", "ISBN-13"),
    ] {
        if let Some(value) = details.get(key) {
            let _ = writeln!(body, "<dt>{label}:</dt><dd>{}</dd>", html_escape(&text(value)));
        }
    }
    body.push_str("</dl>\n");
}

fn render_reviews(body: &mut String, reviews: &Value) {
    for review in reviews["reviews"].as_array().into_iter().flatten() {
        let _ = write!(
            body,
            "<blockquote>\n<p>\n{}\n</p>\n<small>\n{}\n</small>\n",
            html_escape(&text(&review["text"])),
            html_escape(&text(&review["reviewer"])),
        );
        let rating = &review["rating"];
        if let Some(stars) = rating["stars"].as_i64() {
            let filled = usize::try_from(stars.clamp(0, 5)).unwrap_or(0);
            let color = html_escape(rating["color"].as_str().unwrap_or("black"));
            let _ = write!(
                body,
                "<p class=\"rating\" title=\"{stars} of 5\">\n\
                 <span style=\"color: {color}\" aria-hidden=\"true\">{}{}</span>\n\
                 stars: {color}\n</p>\n",
                "\u{2605}".repeat(filled),
                "\u{2606}".repeat(5 - filled),
            );
        } else if rating.get("error").is_some() {
            let _ = write!(body, "<p class=\"rating error\">\n{RATINGS_UNAVAILABLE}\n</p>\n");
        }
        body.push_str("</blockquote>\n");
    }
    let served_by = reviews["podname"].as_str().unwrap_or("unknown");
    let _ = write!(body, "<p class=\"served-by\">\nReviews served by: {}\n</p>\n", html_escape(served_by));
}
