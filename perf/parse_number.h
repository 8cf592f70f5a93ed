/* Numbers from the command line of the benchmark's C tools, checked whole and in
   range. Header-only, like http_head.h. */
#ifndef PAYCORE_PERF_PARSE_NUMBER_H
#define PAYCORE_PERF_PARSE_NUMBER_H

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

/* A decimal integer in [min, max]. */
static inline bool parse_long(const char *text, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < min || value > max)
        return false;
    *out = value;
    return true;
}

/* A finite number in [min, max]. */
static inline bool parse_double(const char *text, double min, double max, double *out)
{
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno || end == text || *end || !isfinite(value) || value < min || value > max)
        return false;
    *out = value;
    return true;
}

#endif
