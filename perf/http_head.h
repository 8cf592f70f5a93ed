/* Reading the header lines of an HTTP/1.x head, shared by the load generator,
   the constant-response server and the processor emulator. Header-only: each
   program is one gcc call. */
#ifndef PAYCORE_PERF_HTTP_HEAD_H
#define PAYCORE_PERF_HTTP_HEAD_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

struct http_header {
    const char *name;
    size_t name_len;
    const char *value;     /* blanks trimmed on both sides */
    const char *value_end;
};

static inline bool http_is_blank(char c)
{
    return c == ' ' || c == '\t';
}

/* The first header line of a complete head (which ends with its blank line). */
static inline const char *http_first_header_line(const char *head, size_t len)
{
    return (const char *)memchr(head, '\n', len) + 1;
}

/* Reads the header line at *line and moves *line to the next one. Returns 1
   with *header filled, 0 at the blank line that ends the head, -1 for a line
   without a colon. */
static inline int http_next_header(const char **line, const char *end, struct http_header *header)
{
    const char *eol = memchr(*line, '\n', (size_t)(end - *line));
    const char *line_end = eol > *line && eol[-1] == '\r' ? eol - 1 : eol;
    if (line_end == *line)
        return 0;
    const char *colon = memchr(*line, ':', (size_t)(line_end - *line));
    if (!colon)
        return -1;
    header->name = *line;
    header->name_len = (size_t)(colon - *line);
    header->value = colon + 1;
    header->value_end = line_end;
    while (header->value < header->value_end && http_is_blank(*header->value))
        header->value++;
    while (header->value_end > header->value && http_is_blank(header->value_end[-1]))
        header->value_end--;
    *line = eol + 1;
    return 1;
}

/* Whether a comma-separated header value (Connection: keep-alive, close) lists token. */
static inline bool http_has_token(const char *value, const char *end, const char *token)
{
    size_t len = strlen(token);
    while (value < end) {
        const char *comma = (const char *)memchr(value, ',', (size_t)(end - value));
        const char *item_end = comma ? comma : end;
        const char *item = value;
        while (item < item_end && http_is_blank(*item))
            item++;
        const char *last = item_end;
        while (last > item && http_is_blank(last[-1]))
            last--;
        if ((size_t)(last - item) == len && strncasecmp(item, token, len) == 0)
            return true;
        value = item_end + 1;
    }
    return false;
}

static inline bool http_header_is(const struct http_header *header, const char *name)
{
    return header->name_len == strlen(name) && strncasecmp(header->name, name, header->name_len) == 0;
}

/* A Content-Length value: 1 to 15 digits and nothing else. */
static inline bool http_parse_length(const struct http_header *header, uint64_t *length)
{
    const char *digit = header->value;
    size_t digits = (size_t)(header->value_end - digit);
    if (digits == 0 || digits > 15)
        return false;
    uint64_t value = 0;
    for (; digit < header->value_end; digit++) {
        if (*digit < '0' || *digit > '9')
            return false;
        value = value * 10 + (uint64_t)(*digit - '0');
    }
    *length = value;
    return true;
}

#endif
